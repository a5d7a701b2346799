"""The real Snakemake workflow, end to end, on a tiny config (a couple of minutes on 2 cores):
outputs, reruns after single config changes, the between-workflow cache, config selection."""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

# The tests' tiny config, also runnable by hand (see its header).
TINY = yaml.safe_load((ROOT / ".test" / "config" / "config.yaml").read_text())


def _snakemake(
    workdir: Path, *args: str, config: str = "config.yaml", env: dict | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [
            *SNAKEMAKE,
            "-s",
            str(ROOT / "Snakefile"),
            "--directory",
            str(workdir),
            *(["--configfile", str(workdir / config)] if config else []),
            "--cores",
            "2",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=3000,
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workflow")
    (workdir / "config.yaml").write_text(yaml.safe_dump(TINY))
    run = _snakemake(workdir)
    assert run.returncode == 0, run.stderr[-5000:]
    return workdir / "results"


def test_outputs_exist_with_their_schemas(finished):
    manifest = pl.read_parquet(finished / "tiny/data/manifest.parquet")
    assert {"sample_id", "source_index", "label", "role"} <= set(manifest.columns)
    assert manifest.height == 160 and manifest["source_index"].n_unique() == 160
    errors = pl.read_parquet(finished / "tiny/errors.parquet")
    # target: 3 decoders x 80 images; shadows: 2 x 160 images; each x 2 ratios x 2 masks
    assert errors.height == (3 * 80 + 2 * 160) * 2 * 2
    assert set(errors["decoder"]) == {"shadow", "adapted", "released"}
    # Error tables hold no labels: roles and membership are joined at attack time.
    assert not {"role", "is_member"} & set(errors.columns)
    for png in ("roc.png", "figures/error_histograms.png", "figures/reconstructions-adapted.png"):
        assert (finished / "tiny" / png).read_bytes()[:4] == b"\x89PNG"
    import pyarrow.parquet as pq

    meta = pq.read_schema(finished / "tiny/errors.parquet").metadata
    assert meta[b"seed"] == b"1" and len(meta[b"manifest_sha256"]) == 64


def test_metrics_are_in_range(finished):
    metrics = json.loads((finished / "tiny/metrics.json").read_text())
    assert metrics["seed"] == 1 and len(metrics["manifest_sha256"]) == 64
    rows = metrics["results"]
    assert {r["attack"] for r in rows} >= {"threshold", "classifier", "lira", "rmia", "random"}
    for r in rows:
        assert 0.0 <= r["auc"] <= 1.0
        assert r["auc_ci_low"] <= r["auc"] <= r["auc_ci_high"]
        assert 0.0 <= r["tpr_at_fpr_0.01"] <= 1.0
    summary = pl.read_parquet(finished / "summary.parquet")
    assert set(summary["experiment"]) == {"tiny", "tiny-simmim"}
    assert summary.filter(pl.col("experiment") == "tiny").height == len(rows)
    simmim = json.loads((finished / "tiny-simmim/metrics.json").read_text())["results"]
    assert {(r["decoder"], r["attack"]) for r in simmim} == {
        (d, a) for d in ("released", "adapted") for a in ("threshold", "lira")
    }
    sidecar = json.loads((finished / "tiny-simmim/models/target/model.json").read_text())
    log = (finished / "logs/tiny/pretrain/target.log").read_text()
    assert "pretrain finished in" in log  # cached rules keep their timing in their log
    assert sidecar["spec"]["recipe"] == "simmim" and sidecar["spec"]["mask_patch_size"] == 8


def test_second_run_has_nothing_to_do_and_uses_the_workflow_profile(finished):
    run = _snakemake(finished.parent, "--dry-run")
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout + run.stderr
    assert "Nothing to be done" in out
    assert re.search(r"Using workflow specific profile \S*profiles/default", out)


def _scheduled(workdir: Path, config: dict) -> dict[str, int]:
    """Rule -> job count a dry run schedules for ``config`` in an already finished workdir."""
    (workdir / "changed.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run = _snakemake(workdir, "--dry-run", "--quiet", "rules", config="changed.yaml")
    assert run.returncode == 0, run.stderr[-3000:]
    return {
        parts[0]: int(parts[1])
        for parts in map(str.split, run.stdout.splitlines())
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total"
    }


REPORT = {"experiment_metrics", "figures", "summary", "all"}


def _changed(**sections) -> dict:
    config = copy.deepcopy(TINY)
    for dotted, value in sections.items():
        node = config["defaults"]
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return config


def test_a_change_reruns_exactly_what_depends_on_it(finished):
    workdir = finished.parent
    # More reference models: the new model, its errors and what reads them; no retraining
    # of the target or of the existing shadow models, no re-sharding.
    jobs = _scheduled(workdir, _changed(shadow__count=3))
    assert set(jobs) == {"membership", "pretrain", "extract", "collect_errors", "attack"} | REPORT
    assert jobs["pretrain"] == jobs["membership"] == 2  # shadow2 of each experiment
    # Other masks: extraction and everything after it, no training.
    jobs = _scheduled(workdir, _changed(extract__num_masks=3))
    assert set(jobs) == {"extract", "collect_errors", "attack"} | REPORT
    # One attack's parameter: that attack (both decoders of tiny-simmim) and the report.
    config = copy.deepcopy(TINY)
    config["experiments"]["tiny-simmim"]["attacks"] = {
        "threshold": {},
        "lira": {"per_sample_variance_min": 8},
    }
    jobs = _scheduled(workdir, config)
    assert jobs == {"attack": 2, "experiment_metrics": 1, "figures": 1, "summary": 1, "all": 1}
    # Runtime knobs change nothing.
    assert _scheduled(workdir, _changed(runtime__batch_size=7, runtime__num_workers=1)) == {}


def test_a_config_that_differs_only_in_form_reruns_nothing(finished):
    config = copy.deepcopy(TINY)
    # Keys in another order, defaults written out, whole floats: the same experiments.
    config["defaults"]["split"] = dict(reversed(list(config["defaults"]["split"].items())))
    config["defaults"]["pretrain"]["checkpoint_every"] = 25
    config["defaults"]["pretrain"]["epochs"] = 3.0
    config["defaults"]["metrics"]["n_bootstrap"] = 50.0
    assert _scheduled(finished.parent, config) == {}


CACHED = {
    "defaults": {
        **{k: TINY["defaults"][k] for k in ("dataset", "model", "adapt", "runtime")},
        "split": {**TINY["defaults"]["split"], "shard_size": 40},
        "pretrain": {"epochs": 2, "batch_size": 20, "warmup_epochs": 1, "blr": 1e-2},
        "shadow": {"count": 1},
        "decoder": ["released"],
        "extract": {"mask_ratios": [0.75], "num_masks": 2, "grid_samples": 1},
        "attacks": {"threshold": {}},
        "metrics": {"n_bootstrap": 10},
    },
}


def test_two_workflows_share_trained_models_through_the_cache(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    runs = {}
    # Two workflow directories, experiments of different names, same data and models.
    for name in ("first", "second"):
        workdir = tmp_path / name
        workdir.mkdir()
        config = {**CACHED, "experiments": {f"audit-{name}": {}}}
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        run = _snakemake(workdir, "--cache", env={"SNAKEMAKE_OUTPUT_CACHE": str(cache)})
        assert run.returncode == 0, run.stderr[-5000:]
        runs[name] = workdir / "results" / f"audit-{name}"

    def ran(name: str, stage: str) -> list[str]:
        """Jobs of ``stage`` that ran (a job taken from the cache leaves an empty log)."""
        logs = runs[name].parent / "logs" / f"audit-{name}" / stage
        return sorted(p.name for p in logs.glob("*.log") if p.read_text().strip())

    assert ran("first", "pretrain") == ["shadow0.log", "target.log"]
    assert ran("second", "pretrain") == []  # nothing trained: both models came from the cache
    assert ran("second", "shards") == []
    log = sorted((runs["second"].parent.parent / ".snakemake" / "log").glob("*.log"))[-1]
    for model in ("target", "shadow0"):
        weights = f"results/audit-second/models/{model}/model.safetensors"
        assert f"Symlinking output file {weights} from cache" in log.read_text()
        a = (runs["first"] / "models" / model / "model.safetensors").read_bytes()
        b = (runs["second"] / "models" / model / "model.safetensors").read_bytes()
        assert a == b
    first = json.loads((runs["first"] / "metrics.json").read_text())["results"]
    second = json.loads((runs["second"] / "metrics.json").read_text())["results"]
    assert first == second


def test_a_users_config_file_runs_only_its_own_experiments(tmp_path):
    config = {"experiments": {"mine": {"split": {"shard_size": 400}}}}
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(config))
    outputs = {}
    for flags in ((), ("--replace-workflow-config",)):
        run = _snakemake(tmp_path, "--dry-run", *flags, config="my.yaml")
        assert run.returncode == 0, run.stderr[-3000:]
        outputs[flags] = run.stdout
        assert "results/mine/metrics.json" in run.stdout
        assert "digits-mae" not in run.stdout
    # Both ways give the schema's defaults: the same jobs.
    totals = {k: re.search(r"^total\s+(\d+)", v, flags=re.M).group(1) for k, v in outputs.items()}
    assert len(set(totals.values())) == 1
    # The `select` key keeps a subset of a config's experiments.
    config["experiments"]["other"] = {}
    config["select"] = ["other"]
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(config))
    run = _snakemake(tmp_path, "--dry-run", config="my.yaml")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "results/other/metrics.json" in run.stdout and "results/mine/" not in run.stdout


def test_ablations_expand_into_the_dag(tmp_path):
    config = {
        **TINY,
        "experiments": {"tiny": {}},
        "ablations": {
            "epochs": {"base": "tiny", "parameter": "pretrain.epochs", "values": [2, 4]},
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = _snakemake(tmp_path, "--dry-run", "--quiet", "rules")
    assert run.returncode == 0, run.stderr[-3000:]
    counts = {
        parts[0]: int(parts[1])
        for parts in map(str.split, run.stdout.splitlines())
        if len(parts) == 2 and parts[1].isdigit()
    }
    assert counts["ablation_plot"] == 1
    assert counts["experiment_metrics"] == 3  # tiny and its two ablation values
    assert counts["pretrain"] == 3 * 3  # target + 2 shadows per experiment
