"""The real Snakemake workflow, end to end, on a tiny config (a couple of minutes on 2 cores)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

TINY = {
    "defaults": {
        "seed": 1,
        "dataset": {"name": "digits", "img_size": 16},
        "split": {
            "target_member": 40,
            "target_nonmember": 40,
            "shadow_member": 40,
            "shadow_nonmember": 40,
            "shard_size": 20,
        },
        "model": {
            "encoder_overrides": {"embed_dim": 32, "depth": 1, "num_heads": 2},
            "patch_size": 4,
            "decoder_embed_dim": 32,
            "decoder_depth": 1,
            "decoder_num_heads": 2,
        },
        "pretrain": {"epochs": 3, "batch_size": 20, "warmup_epochs": 1, "blr": 1e-2},
        "adapt": {"epochs": 2, "batch_size": 20, "warmup_epochs": 1},
        "shadow": {"count": 2},
        "decoder": ["shadow", "adapted", "released"],
        "extract": {
            "mask_ratios": [0.5, 0.75],
            "num_masks": 2,
            "batch_size": 16,
            "num_workers": 0,
            "grid_samples": 2,
        },
        "metrics": {"n_bootstrap": 50},
    },
    "experiments": {
        "tiny": {},
        "tiny-simmim": {
            "model": {"recipe": "simmim", "mask_patch_size": 8},
            "decoder": ["released", "adapted"],
            "attacks": {"threshold": {}, "lira": {}},
        },
    },
}


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            *SNAKEMAKE,
            "-s",
            str(ROOT / "Snakefile"),
            "--directory",
            str(workdir),
            "--configfile",
            str(workdir / "config.yaml"),
            "--cores",
            "2",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
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
    assert manifest.schema == {
        "sample_id": pl.String,
        "source_index": pl.Int64,
        "label": pl.Int64,
        "role": pl.String,
    }
    assert manifest.height == 160 and manifest["source_index"].n_unique() == 160
    errors = pl.read_parquet(finished / "tiny/errors.parquet")
    # target: 3 decoders x 80 images; shadows: 2 x 160 images; each x 2 ratios x 2 masks
    assert errors.height == (3 * 80 + 2 * 160) * 2 * 2
    assert set(errors["decoder"]) == {"shadow", "adapted", "released"}
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
    assert sidecar["spec"]["recipe"] == "simmim" and sidecar["spec"]["mask_patch_size"] == 8


def test_second_run_has_nothing_to_do(finished):
    run = _snakemake(finished.parent, "--dry-run", "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Nothing to be done" in run.stdout + run.stderr


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
