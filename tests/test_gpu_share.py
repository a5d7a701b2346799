"""Small models share a GPU: `gpu_share` jobs per GPU, a local counter capped at GPUs x share
and `--gres=shard:1` on SLURM; several-process training keeps whole GPUs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mimia.config import gpu_request
from mimia.layout import ROLES

ROOT = Path(__file__).resolve().parents[1]
# As test_profiles.py's digits config, with adaptation in two processes (whole GPUs).
CONFIG = {
    "gpu": 1,
    "gpu_share": 4,
    "experiments": {"e": {}},
    "defaults": {"dataset": {"name": "digits"}, "adapt": {"devices": 2}},
}


def test_a_one_process_job_takes_one_share_and_no_whole_gpu():
    assert gpu_request(1, 4) == {"gpu": 0, "gpu_shard": 1, "gres": "shard:1"}
    # Several processes: whole GPUs, and locally every share of them.
    assert gpu_request(1, 4, processes=2) == {"gpu": 2, "gpu_shard": 8, "gres": ""}
    # No sharing: as before (gpu per process), the shard counter in step with it.
    assert gpu_request(2, 1, processes=3) == {"gpu": 6, "gpu_shard": 6, "gres": ""}
    assert gpu_request(0, 1) == {"gpu": 0, "gpu_shard": 0, "gres": ""}


def test_a_share_of_several_gpus_is_refused():
    with pytest.raises(ValueError, match=r"gpu_share: 2 splits one GPU .* not gpu: 2"):
        gpu_request(2, 2)


def _dry_run(tmp_path, config: dict, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--dry-run"]
    cmd += ["--directory", str(tmp_path), "--configfile", str(tmp_path / "config.yaml")]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=900)


def _jobs(stdout: str):
    """``(rule, resources)`` of every job a dry run lists (a localrule's job is printed as
    ``localrule NAME:``, a group's jobs indented under it)."""
    for block in re.split(r"\n\s*(?:local)?rule ", stdout)[1:]:
        line = re.search(r"resources: (.*)", block).group(1)
        yield block.split(":", 1)[0], dict(item.split("=", 1) for item in line.split(", "))


def _resources(stdout: str) -> dict[str, set[tuple]]:
    """Per rule, the distinct (gpu, gpu_shard, gres) requests of its jobs in a dry run."""
    requests: dict[str, set[tuple]] = {}
    for rule, res in _jobs(stdout):
        requests.setdefault(rule, set()).add(
            (int(res.get("gpu", 0)), int(res.get("gpu_shard", 0)), res.get("gres", ""))
        )
    return requests


def test_local_jobs_ask_for_a_share_of_a_gpu(tmp_path):
    # One-process GPU jobs take one of the gpu_share shards of a GPU; the two-process
    # adaptation takes two whole GPUs, and locally all 2 x 4 of their shards.
    run = _dry_run(tmp_path, CONFIG, "--resources", "gpu=2")
    assert run.returncode == 0, run.stderr[-3000:]
    requests = _resources(run.stdout)
    for rule in ("pretrain", "extract", "embed"):
        assert requests[rule] == {(0, 1, "shard:1")}, rule
    assert requests["adapt_decoder"] == {(2, 8, "")}
    # CPU-only jobs ask for nothing GPU (reconstructions names the gres its group shares).
    assert requests["attack"] == {(0, 0, "")}
    assert requests["reconstructions"] == {(0, 0, "shard:1")}


# The tests' tiny config (.test/config/config.yaml) with 20 images per role, two shadows and
# trainings long enough that every model's training is still running when the last starts.
TINY_TEST = yaml.safe_load((ROOT / ".test" / "config" / "config.yaml").read_text())
TINY = {
    "gpu": 1,
    "gpu_share": 2,
    "defaults": {
        **TINY_TEST["defaults"],
        "split": dict.fromkeys(ROLES, 20) | {"shard_size": 20},
        "pretrain": {"epochs": 40, "batch_size": 10, "warmup_epochs": 1, "blr": 1e-2},
        "adapt": {"batch_size": 10},
        "shadow": {"count": 2},
        "runtime": {"device": "cpu", "num_workers": 0},
    },
    "experiments": {"tiny": {}},
}


def _most_at_once(log: str, rule: str) -> int:
    """The largest number of ``rule`` jobs running at one time, from Snakemake's log (a job
    starts at its ``rule NAME:`` block, ``localrule NAME:`` when Snakemake runs it in its own
    process, and ends at ``Finished jobid: N (Rule: NAME)``)."""
    running, most = set(), 0
    events = re.finditer(
        rf"^(?:local)?rule {rule}:\n(?:\s+\S.*\n)*?\s+jobid: (\d+)"
        rf"|Finished jobid: (\d+) \(Rule: {rule}\)",
        log,
        re.M,
    )
    for event in events:
        started, finished = event.groups()
        if started:
            running.add(started)
            most = max(most, len(running))
        else:
            running.discard(finished)
    return most


@pytest.mark.slow
def test_two_trainings_run_at_once_on_one_gpu_unit(tmp_path):
    # Three models to train, four cores, one GPU offered (the default profile's gpu=1): with
    # gpu_share 2 the local cap is 2 shards, so two trainings run side by side, never three.
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "4"]
    cmd += ["--directory", str(tmp_path), "--configfile", str(tmp_path / "config.yaml")]
    cmd += ["--until", "pretrain", "--resources", "gpu=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-5000:]
    log = run.stdout + run.stderr
    # Snakemake's "Provided resources" line (9.x prints gpu_shard=Resource("gpu_shard", 2)).
    assert re.search(r'gpu_shard=(Resource\("gpu_shard", )?2\b', log), log[:3000]
    assert log.count("Finished jobid") and _most_at_once(log, "pretrain") == 2


def test_slurm_submissions_ask_for_a_shard_or_whole_gpus(tmp_path):
    """What the SLURM plugin would add to sbatch for the dry run's resources (its own
    `set_gres_string`, the part of the submission that concerns GPUs)."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    from types import SimpleNamespace

    from snakemake.iocontainers import ResourceList
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    # Through the SLURM profile: its groups put extraction, embedding and reconstruction
    # figures in one submission, whose jobs must agree on gres (a dry run refuses otherwise).
    profile = ["--workflow-profile", str(ROOT / "workflow" / "profiles" / "slurm")]
    run = _dry_run(tmp_path, CONFIG, *profile)
    assert run.returncode == 0, run.stderr[-3000:]
    sbatch = {}
    for rule, res in _jobs(run.stdout):
        res = {k: int(v) if v.isdigit() else v for k, v in res.items() if "<TBD>" not in v}
        job = SimpleNamespace(resources=ResourceList(fromdict=res))
        sbatch.setdefault(rule, set()).add(set_gres_string(job).strip())
    for rule in ("pretrain", "extract", "embed", "reconstructions"):
        assert sbatch[rule] == {"--gres=shard:1"}, rule
    assert sbatch["adapt_decoder"] == {"--gpus=2"}
    assert sbatch["attack"] == {""}
    # Without sharing, the requests are the plain --gpus of before and no gres at all.
    run = _dry_run(tmp_path, {**CONFIG, "gpu_share": 1}, *profile)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "gres=shard" not in run.stdout
