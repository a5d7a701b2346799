"""Auditing an encoder mimia did not train: import, then the workflow's DAG around it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from mimia.config import model_spec
from mimia.models.checkpoint import import_stage, load_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = {
    "encoder": "vit_tiny_patch16_224",
    "encoder_overrides": {"embed_dim": 32, "depth": 2, "num_heads": 2},
    "patch_size": 4,
    "decoder_embed_dim": 32,
    "decoder_depth": 1,
    "decoder_num_heads": 2,
}


def _timm_encoder(path: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=16,
        patch_size=4,
        num_classes=0,
        embed_dim=32,
        depth=2,
        num_heads=2,
    )
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return vit


def _exp(checkpoint: Path, decoder: list[str]) -> dict:
    exp = {
        "seed": 0,
        "dataset": {"img_size": 16},
        "model": {"recipe": "mae", **MODEL},
        "target": {"checkpoint": str(checkpoint), "format": "timm"},
        "decoder": decoder,
    }
    model_spec(exp)  # the config section is a valid architecture
    return exp


def test_import_stage_writes_an_encoder_only_target(tmp_path):
    vit = _timm_encoder(tmp_path / "enc.safetensors")
    out = tmp_path / "target" / "model.safetensors"
    info = import_stage(
        _exp(tmp_path / "enc.safetensors", ["adapted"]), tmp_path / "enc.safetensors", out
    )
    assert info["decoder_released"] is False
    model = load_model(out)
    for k, v in vit.state_dict().items():
        if k in model.encoder.state_dict() and k != "pos_embed":
            assert torch.equal(model.encoder.state_dict()[k], v), k
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["info"]["imported"]["format"] == "timm"
    with pytest.raises(ValueError, match="no decoder"):
        import_stage(
            _exp(tmp_path / "enc.safetensors", ["released"]),
            tmp_path / "enc.safetensors",
            tmp_path / "other" / "model.safetensors",
        )


def test_workflow_imports_instead_of_training_the_target(tmp_path):
    _timm_encoder(tmp_path / "enc.safetensors")
    config = {
        "defaults": {
            "dataset": {"name": "digits", "img_size": 16},
            "model": MODEL,
            "shadow": {"count": 1},
            "decoder": ["shadow", "adapted"],
        },
        "experiments": {
            "audit": {"target": {"checkpoint": str(tmp_path / "enc.safetensors"), "format": "timm"}}
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(ROOT / "Snakefile"),
            "--directory",
            str(tmp_path),
            "--configfile",
            str(tmp_path / "config.yaml"),
            "--cores",
            "1",
            "-n",
            "--quiet",
            "rules",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    counts = {
        line.split()[0]: int(line.split()[1])
        for line in run.stdout.splitlines()
        if len(line.split()) == 2 and line.split()[1].isdigit()
    }
    assert counts["import_target"] == 1
    assert counts["pretrain"] == 1  # shadow0 only: the target is imported, not trained
