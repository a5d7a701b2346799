"""The SLURM profiles name real rules and ask for what the plugin turns into valid sbatch."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROFILES = {
    name: yaml.safe_load((ROOT / "workflow" / "profiles" / name / "profile.yaml").read_text())
    for name in ("slurm", "slurm-gpu")
}
RULES = {
    m.group(1)
    for smk in (ROOT / "workflow" / "rules").glob("*.smk")
    for m in re.finditer(r"^rule (\w+):", smk.read_text(), re.M)
}
GPU_RULES = {"pretrain", "adapt_decoder", "extract", "embed"}


@pytest.mark.parametrize("name", PROFILES)
def test_profile_names_only_rules_of_the_workflow(name):
    profile = PROFILES[name]
    named = set(profile.get("groups", {})) | set(profile.get("set-resources", {}))
    named |= set(profile.get("set-threads", {}))
    assert named and named <= RULES, named - RULES
    groups = set(profile["groups"].values())
    assert set(profile.get("group-components", {})) <= groups


@pytest.mark.parametrize("name", PROFILES)
def test_a_group_is_one_job_wide(name):
    # The plugin's job step runs a group's jobs one by one (--jobs 1): a group asking for the
    # sum of its jobs' CPUs, memory or GPUs would hold them idle. Layers are one job wide
    # when every grouped rule takes all of `cores`.
    profile = PROFILES[name]
    threads = profile.get("set-threads", {})
    for rule in profile["groups"]:
        assert threads.get(rule, 1) == profile["cores"], (rule, threads.get(rule, 1))


def test_gpu_profile_requests():
    profile = PROFILES["slurm-gpu"]
    resources = profile["set-resources"]
    for rule in GPU_RULES:
        res = resources[rule]
        assert res["gpu"] >= 1 and res["gpu_model"], rule
        assert res["cpus_per_gpu"] == profile["set-threads"][rule]
    for rule, res in resources.items():
        # gpu_model with no GPU would become --gpus=MODEL:0
        assert "gpu_model" not in res or res.get("gpu", 0) >= 1, rule
    # Jobs of one group must agree on string resources, or Snakemake refuses the group.
    by_group: dict[str, list[str]] = {}
    for rule, group in profile["groups"].items():
        by_group.setdefault(group, []).append(rule)
    for group, rules in by_group.items():
        for key in ("slurm_partition", "gpu_model"):
            values = {resources.get(r, {}).get(key) for r in rules}
            assert len(values) == 1, (group, key, values)
    assert profile["retries"] >= 1


@pytest.mark.parametrize("name", PROFILES)
def test_snakemake_accepts_the_profile(name, tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump({"experiments": {"e": {}}, "defaults": {"dataset": {"name": "digits"}}})
    )
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile")]
    cmd += ["--directory", str(tmp_path), "--configfile", str(tmp_path / "config.yaml")]
    cmd += ["--workflow-profile", str(ROOT / "workflow" / "profiles" / name)]
    run = subprocess.run(
        [*cmd, "--dry-run", "--quiet", "rules"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "extract" in run.stdout


def test_multi_gpu_training_asks_for_a_gpu_per_process(tmp_path):
    """`gpu` GPUs per process: a 2-process pre-training asks for 2 x gpu GPUs and 2 cores;
    extraction, one process, for gpu."""
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "gpu": 2,
                "experiments": {"e": {}},
                "defaults": {"dataset": {"name": "digits"}, "pretrain": {"devices": 2}},
            }
        )
    )
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--dry-run"]
    cmd += ["--directory", str(tmp_path), "--configfile", str(tmp_path / "config.yaml")]
    # Locally a job's request is capped at what --resources offers: offer plenty.
    run = subprocess.run(
        [*cmd, "--resources", "gpu=64"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    requests = {}
    for block in run.stdout.split("\nrule ")[1:]:
        rule = block.split(":", 1)[0]
        threads = re.search(r"threads: (\d+)", block)
        gpu = re.search(r"\bgpu=(\d+)", block)
        requests.setdefault(rule, set()).add(
            (int(threads.group(1)) if threads else 1, int(gpu.group(1)) if gpu else 0)
        )
    assert requests["pretrain"] == {(2, 4)}
    assert requests["extract"] == {(1, 2)}
    assert requests["adapt_decoder"] == {(1, 2)}  # adapt.devices stays 1
