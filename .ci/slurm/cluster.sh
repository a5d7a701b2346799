#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the SLURM end-to-end test (tests/test_slurm.py).
#   cluster.sh install    apt-get slurm-wlm + munge (nothing to do when they are there)
#   cluster.sh start DIR  write the config, start munged, slurmctld, slurmd (state and logs in DIR)
#   cluster.sh stop DIR   stop the daemons started from DIR, remove the config it wrote
# Needs root. The config goes to /etc/slurm/slurm.conf: the plugin's job step drops SLURM_CONF
# from the environment of its srun, so only the default path reaches every client. A
# slurm.conf that this script did not write is never touched.
set -euo pipefail

ETC=/etc/slurm
MARK="# written by mimia .ci/slurm/cluster.sh"

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v munged >/dev/null; then
    return
  fi
  export DEBIAN_FRONTEND=noninteractive
  # Bounded: a stuck mirror fails the test instead of hanging CI. apt's own cache makes a
  # second install (or a cached CI image) a no-op.
  timeout 300 apt-get update -qq
  timeout 600 apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

start() {
  local dir=$1 host cpus mem gpus port
  if [[ -e $ETC/slurm.conf ]] && ! grep -qF "$MARK" "$ETC/slurm.conf"; then
    echo "$ETC/slurm.conf belongs to a SLURM installation here; not replacing it" >&2
    return 3
  fi
  mkdir -p "$dir"/{ctld,spool,munge} "$ETC"
  chmod 700 "$dir/munge"
  host=$(hostname -s)
  # nproc would obey OMP_NUM_THREADS (1 in the test's environment): the CPUs this machine
  # gives us, not a thread setting.
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
  # 90 % of the memory: slurmd drains a node that reports less than it was configured with.
  mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
  port=${MIMIA_SLURM_PORT:-6817}
  # Fake GPUs (plain files, no devices): GPU requests are scheduled as on a GPU cluster while
  # the jobs themselves run on the CPU.
  gpus=${MIMIA_SLURM_GPUS:-2}
  for i in $(seq 0 $((gpus - 1))); do touch "$dir/gpu$i"; done
  cat >"$ETC/gres.conf" <<CONF
$MARK
AutoDetect=off
NodeName=$host Name=gpu Type=ci File=$dir/gpu[0-$((gpus - 1))]
CONF
  cat >"$ETC/slurm.conf" <<CONF
$MARK
ClusterName=mimia-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
SlurmctldPort=$port
SlurmdPort=$((port + 1))
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# No slurmdbd: the plugin reads job states with squeue, which sees a finished job for
# MinJobAge seconds (the plugin wants at least 3x its first status-check delay). An hour, so
# that the test can still list every job of a slow run at its end.
MinJobAge=3600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
GresTypes=gpu
NodeName=$host CPUs=$cpus RealMemory=$mem Gres=gpu:ci:$gpus State=UNKNOWN
PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=ALL MaxTime=INFINITE State=UP
CONF
  cp /etc/munge/munge.key "$dir/munge/munge.key"
  chmod 400 "$dir/munge/munge.key"
  munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
    --seed-file="$dir/munge/munged.seed"
  slurmctld
  slurmd
  for _ in $(seq 60); do
    if [[ $(sinfo -h -N -o %t 2>/dev/null | sort -u) == idle ]]; then
      return
    fi
    sleep 1
  done
  echo "slurm did not come up; logs in $dir:" >&2
  tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
  return 1
}

stop() {
  local dir=$1 pidfile pid
  # Jobs first (a run stopped by a timeout may leave some), so no job step outlives slurmd.
  if [[ -s $dir/slurmctld.pid ]] && kill -0 "$(<"$dir/slurmctld.pid")" 2>/dev/null; then
    scancel --quiet --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 30); do
      [[ -z $(squeue --noheader --states=RUNNING,COMPLETING 2>/dev/null) ]] && break
      sleep 1
    done
  fi
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    [[ -s $pidfile ]] || continue
    pid=$(<"$pidfile")
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do
      # A stopped daemon may linger as a zombie where nothing reaps it: gone is enough.
      [[ $(ps -o stat= -p "$pid" 2>/dev/null) =~ ^[^Z] ]] || break
      sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
  done
  for conf in "$ETC/slurm.conf" "$ETC/gres.conf"; do
    if [[ -e $conf ]] && grep -qF "$MARK" "$conf"; then
      rm -f "$conf"
    fi
  done
}

case ${1:-} in
  install) install ;;
  start) start "$2" ;;
  stop) stop "$2" ;;
  *)
    echo "usage: $0 install | start DIR | stop DIR" >&2
    exit 2
    ;;
esac
