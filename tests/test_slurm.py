"""The workflow on a real one-node SLURM cluster (slurmctld + slurmd + munged on this machine),
through the project's SLURM profile, against a local run of the same config.

Needs root (it installs slurm-wlm and munge with apt-get when missing, and starts the daemons)
and the `slurm` extra. Elsewhere it is skipped; with MIMIA_REQUIRE_SLURM=1 (CI) a cluster that
cannot start fails the test instead. Wall times go to the terminal summary and to
$MIMIA_SLURM_TIMES (JSON) when set.
"""

import fcntl
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / ".ci" / "slurm" / "cluster.sh"
REQUIRED = os.environ.get("MIMIA_REQUIRE_SLURM") == "1"
RUN_TIMEOUT = 1500  # seconds per workflow run; then SIGINT, which cancels the SLURM jobs

# The tests' tiny config (.test/config/config.yaml) made as small as the workflow allows while
# every stage runs: one shard per role, a target and a shadow, the shadow decoder, one attack.
# GPU rules ask for a GPU (the test node has fake ones), so the submissions carry --gpus as on
# a GPU cluster.
TINY = yaml.safe_load((ROOT / ".test" / "config" / "config.yaml").read_text())
CONFIG = {
    "gpu": 1,
    "defaults": {
        **TINY["defaults"],
        "runtime": {"batch_size": 20, "num_workers": 0},
        "split": {**dict.fromkeys(TINY["defaults"]["split"], 20), "shard_size": 20},
        "pretrain": {"epochs": 2, "batch_size": 10, "warmup_epochs": 1, "blr": 1e-2},
        "adapt": {"epochs": 1, "batch_size": 10, "warmup_epochs": 0},  # validated, not run
        "shadow": {"count": 1},
        "decoder": ["shadow"],
        "extract": {"mask_ratios": [0.75], "num_masks": 2, "grid_samples": 2},
        "attacks": {"threshold": {}},
        "metrics": {"n_bootstrap": 20},
    },
    "experiments": {"tiny": {}},
}
GPU_RULES = {"pretrain", "adapt_decoder", "extract", "embed"}


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"SLURM test required (MIMIA_REQUIRE_SLURM=1) but {reason}")
    pytest.skip(reason)


def _cluster(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        _unavailable("starting slurmctld/slurmd needs root")
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        _unavailable("snakemake-executor-plugin-slurm is not installed (extra `slurm`)")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        _unavailable("no slurm-wlm and no apt-get to install it")
    # One cluster per machine: it owns /etc/slurm/slurm.conf and the SLURM ports.
    with (tmp_path_factory.getbasetemp().parent / "mimia-slurm.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _unavailable("another SLURM test is using this machine's cluster")
        installed = _cluster("install", timeout=960)
        if installed.returncode:
            _unavailable(f"installing slurm-wlm failed: {installed.stderr[-2000:]}")
        state = tmp_path_factory.mktemp("slurm")
        try:
            started = _cluster("start", str(state), timeout=120)
            if started.returncode == 3:
                _unavailable(started.stderr.strip())
            assert started.returncode == 0, started.stderr[-3000:]
            # The node offers every CPU the local run gets, or the comparison is unfair.
            node_cpus = subprocess.run(
                ["sinfo", "--noheader", "--Node", "--format=%c"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            # (one line per partition the node is in)
            assert set(node_cpus) == {str(len(os.sched_getaffinity(0)))}, node_cpus
            yield state
        finally:
            stopped = _cluster("stop", str(state), timeout=120)
            assert stopped.returncode == 0, stopped.stderr


def _snakemake(workdir: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """One workflow run; stopped with SIGINT (Snakemake then cancels its SLURM jobs, where
    SIGTERM would wait for them) if it outlasts RUN_TIMEOUT."""
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(ROOT / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        *args,
    ]
    log = workdir / "snakemake.log"
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    seconds = time.monotonic() - start
    text = log.read_text()
    return subprocess.CompletedProcess(cmd, proc.returncode, text, ""), seconds


def _slurm_jobs() -> list[dict]:
    """Every job slurmctld still remembers (MinJobAge keeps finished ones)."""
    fields = "JobID:30,State:30,tres-per-job:80,tres-per-node:80,Comment:500"
    out = subprocess.run(
        ["squeue", "--states=all", "--noheader", f"--Format={fields}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    jobs = []
    for line in out.splitlines():
        # No field holds spaces (the plugin's comment is rule_<name>[_wildcards_<values>]).
        jobid, state, per_job, per_node, comment = line.split()
        gpus = [t for t in (per_job, per_node) if t != "N/A"]
        jobs.append({"id": jobid, "state": state, "comment": comment, "gpus": gpus})
    return jobs


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    local = tmp_path_factory.mktemp("local")
    on_slurm = tmp_path_factory.mktemp("on_slurm")
    for workdir in (local, on_slurm):
        (workdir / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    # The local baseline gets as many GPU tokens as cores, so its GPU rules run in parallel.
    cpus = str(len(os.sched_getaffinity(0)))  # as many as the one SLURM node has
    local_run, local_s = _snakemake(local, "--cores", cpus, "--resources", f"gpu={cpus}")
    assert local_run.returncode == 0, local_run.stdout[-5000:]
    slurm_run, slurm_s = _snakemake(
        on_slurm, "--workflow-profile", str(ROOT / "workflow/profiles/slurm")
    )
    jobs = _slurm_jobs()
    assert slurm_run.returncode == 0, slurm_run.stdout[-8000:]
    times = {"local_s": round(local_s, 1), "slurm_s": round(slurm_s, 1)}
    times["ratio"] = round(slurm_s / local_s, 2)
    times["slurm_submissions"] = len(jobs)
    print(f"\nSLURM test wall times: {json.dumps(times)}")
    if os.environ.get("MIMIA_SLURM_TIMES"):
        Path(os.environ["MIMIA_SLURM_TIMES"]).write_text(json.dumps(times, indent=1))
    return local / "results", on_slurm / "results", jobs, _job_count(local_run.stdout)


def _job_count(log: str) -> int:
    """Jobs of the run, `all` excluded, from Snakemake's "Job stats" table."""
    lines = iter(log.splitlines())
    for line in lines:
        if line.startswith("Job stats:"):
            break
    counts = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
        if parts and parts[0] == "total":
            break
    return counts["total"] - counts.get("all", 0)


def test_cluster_run_reproduces_the_local_summary_byte_for_byte(runs):
    # Same code, config, seeds and thread counts (one per job) on the same CPU: every number
    # must be the same float, so the CSV is compared as bytes.
    local, on_slurm, _, _ = runs
    expected = (local / "summary.csv").read_bytes()
    assert expected.count(b"\n") == 2  # header + the one (decoder, attack) row
    assert (on_slurm / "summary.csv").read_bytes() == expected
    for table in ("tiny/metrics.json",):
        assert json.loads((on_slurm / table).read_text()) == json.loads((local / table).read_text())


def test_every_submission_completed_and_small_jobs_shared_them(runs):
    _, _, jobs, n_jobs = runs
    # manifest, membership, 4 shards, 2 models, 6 extractions, 1 reconstruction figure,
    # collect_errors, attack, experiment_metrics, figures, summary
    assert n_jobs == 20
    assert {j["state"] for j in jobs} == {"COMPLETED"}, jobs
    # One submission for manifest + 4 shards (4 fewer), two for the 6 extractions and the
    # reconstruction figure (4 to a job: 5 fewer), one for collect_errors + attack (1 fewer);
    # the localrules membership, experiment_metrics, figures and summary run here (4 fewer).
    assert len(jobs) == n_jobs - 14, (len(jobs), n_jobs)
    comments = [j["comment"] for j in jobs]
    assert sum(c.startswith("rule_data_tiny") for c in comments) == 1, comments
    assert sum(c.startswith("rule_score_tiny") for c in comments) == 2, comments
    assert sum(c.startswith("rule_attack_tiny") for c in comments) == 1, comments


def test_gpu_rules_ask_slurm_for_a_gpu_and_the_others_for_none(runs):
    _, _, jobs, _ = runs
    for job in jobs:
        comment = job["comment"]
        rule = comment.removeprefix("rule_").split("_wildcards_")[0]
        wants_gpu = rule in GPU_RULES or comment.startswith("rule_score_")
        if wants_gpu:
            assert job["gpus"] == ["gres:gpu:1"], job
        else:
            # No --gpus=0 either: nothing at all about GPUs.
            assert job["gpus"] == [], job
