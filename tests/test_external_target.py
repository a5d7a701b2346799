"""Auditing an encoder mimia did not train: import, then the workflow's DAG around it."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file
from test_workflow import _snakemake

from mimia.config import model_spec, resolve_experiments
from mimia.models import build_model
from mimia.models.checkpoint import load_model, save_model
from mimia.models.spec import IMAGENET_MEAN, declared_spec, spec_differences
from mimia.stages import import_target

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


def _exp(checkpoint: Path, decoder: list[str], fmt="timm", img_size=16, **model) -> dict:
    exp = {
        "seed": 0,
        "dataset": {"img_size": img_size},
        "model": {"recipe": "mae", **MODEL, **model},
        "target": {"checkpoint": str(checkpoint), "format": fmt},
        "decoder": decoder,
    }
    model_spec(exp)  # the config section is a valid architecture
    return exp


def import_stage(exp: dict, checkpoint: Path, weights: Path) -> dict:
    """The import_target rule's stage; returns the import's info from the sidecar."""
    import_target(
        checkpoint=checkpoint,
        weights=weights,
        sidecar=weights.with_suffix(".json"),
        format=exp["target"]["format"],
        spec=model_spec(exp).to_dict(),
        needs_decoder="released" in exp["decoder"],
    )
    return json.loads(weights.with_suffix(".json").read_text())["info"]["imported"]


def test_import_stage_writes_an_encoder_only_target(tmp_path):
    vit = _timm_encoder(tmp_path / "enc.safetensors")
    out = tmp_path / "target" / "model.safetensors"
    info = import_stage(
        _exp(tmp_path / "enc.safetensors", ["adapted"]), tmp_path / "enc.safetensors", out
    )
    assert info["decoder_released"] is False and info["format"] == "timm"
    model = load_model(out)
    for k, v in vit.state_dict().items():
        if k in model.encoder.state_dict() and k != "pos_embed":
            assert torch.equal(model.encoder.state_dict()[k], v), k
    with pytest.raises(ValueError, match="no decoder"):
        import_stage(
            _exp(tmp_path / "enc.safetensors", ["released"]),
            tmp_path / "enc.safetensors",
            tmp_path / "other" / "model.safetensors",
        )


def _mimia_target(path: Path, depth: int, img_size: int) -> Path:
    exp = _exp(
        path,
        ["released"],
        "mimia",
        img_size,
        encoder_overrides={"embed_dim": 32, "depth": depth, "num_heads": 2},
    )
    torch.manual_seed(0)
    save_model(build_model(model_spec(exp)), path, {"decoder_released": True})
    return path


def test_declared_architecture_is_checked_against_the_config(tmp_path, capsys):
    ckpt = _mimia_target(tmp_path / "target" / "model.safetensors", depth=1, img_size=16)
    config = _exp(ckpt, ["released"], "mimia", img_size=32)  # MODEL has depth 2
    declared = declared_spec(ckpt, "mimia")
    assert declared.encoder_overrides["depth"] == 1 and declared.img_size == 16
    diffs = spec_differences(declared, model_spec(config))
    assert diffs == [
        "dataset.img_size: checkpoint 16, config 32",
        "model.encoder_overrides.depth: checkpoint 1, config 2",
    ]
    # The config layer refuses it before any job runs, saying which one wins ...
    with pytest.raises(ValueError) as err:
        resolve_experiments(
            {
                "defaults": {"model": {"recipe": "mae", **MODEL}},
                "experiments": {"audit": {k: config[k] for k in ("dataset", "target")}},
            }
        )
    msg = str(err.value)
    assert all(d in msg for d in diffs) and "The checkpoint is the audited target" in msg
    # ... and the import job checks again, writing nothing.
    with pytest.raises(ValueError) as err:
        import_stage(config, ckpt, tmp_path / "out" / "model.safetensors")
    assert all(d in str(err.value) for d in diffs)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    # A matching config imports, and the log says where each field was read.
    capsys.readouterr()
    import_stage(
        _exp(
            ckpt,
            ["released"],
            "mimia",
            img_size=16,
            encoder_overrides={"embed_dim": 32, "depth": 1, "num_heads": 2},
        ),
        ckpt,
        tmp_path / "out" / "model.safetensors",
    )
    log = capsys.readouterr().err
    assert "model.encoder_overrides.depth = 1" in log and "<- sidecar" in log
    assert load_model(tmp_path / "out" / "model.safetensors").spec.encoder_overrides["depth"] == 1


def test_declared_spec_of_hf_timm_and_mae_checkpoints(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    config = {
        "model_type": "vit_mae",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 256,
        "image_size": 32,
        "patch_size": 4,
        "decoder_hidden_size": 32,
        "decoder_num_hidden_layers": 1,
        "decoder_num_attention_heads": 4,
        "decoder_intermediate_size": 128,
        "layer_norm_eps": 1e-12,
        "norm_pix_loss": True,
    }
    (folder / "config.json").write_text(json.dumps(config))
    spec = declared_spec(folder, "hf")
    assert spec.encoder_overrides == {"embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 4.0}
    assert (spec.img_size, spec.patch_size, spec.norm_eps, spec.norm_pix_loss) == (
        32,
        4,
        1e-12,
        True,
    )
    assert (spec.decoder_embed_dim, spec.decoder_depth, spec.decoder_num_heads) == (32, 1, 4)
    # HF normalises outside the model: mean/std come from preprocessor_config.json, if any.
    assert spec.mean == IMAGENET_MEAN
    fallback = replace(spec, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert declared_spec(folder, "hf", fallback=fallback).mean == (0.5,) * 3
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [1, 1, 1]})
    )
    assert declared_spec(folder, "hf", fallback=fallback).mean == (0.1, 0.2, 0.3)
    assert declared_spec(tmp_path / "enc.safetensors", "timm") is None
    assert declared_spec(tmp_path / "checkpoint-399.pth", "mae") is None
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"HF config .*config\.json is not valid JSON"):
        declared_spec(folder, "hf")
    with pytest.raises(FileNotFoundError, match=r"checkpoint sidecar .*nowhere\.json is missing"):
        declared_spec(tmp_path / "nowhere.safetensors", "mimia")


def test_declared_spec_does_not_import_torch(tmp_path):
    ckpt = _mimia_target(tmp_path / "model.safetensors", depth=1, img_size=16)
    code = (
        "import sys; from mimia.models.spec import declared_spec; "
        f"s = declared_spec({str(ckpt)!r}, 'mimia'); "
        "print(s.encoder_overrides['depth'], 'torch' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["1", "False"]


def test_import_stage_refuses_a_timm_target_unlike_the_config(tmp_path):
    _timm_encoder(tmp_path / "enc.safetensors")  # depth 2
    deeper = _exp(
        tmp_path / "enc.safetensors",
        ["adapted"],
        encoder_overrides={"embed_dim": 32, "depth": 3, "num_heads": 2},
    )
    with pytest.raises(
        ValueError,
        match=r"model\.encoder_overrides\.depth: checkpoint 2 \(weights blocks\.N\), config 3",
    ) as err:
        import_stage(deeper, tmp_path / "enc.safetensors", tmp_path / "t" / "model.safetensors")
    assert "it wins" in str(err.value)
    assert not (tmp_path / "t").exists()


def test_workflow_imports_instead_of_training_the_target(tmp_path):
    _timm_encoder(tmp_path / "enc.safetensors")
    config = {
        "defaults": {
            "dataset": {"name": "digits", "img_size": 16},
            # A timm file records neither heads nor LayerNorm eps: the config states both.
            "model": {**MODEL, "norm_eps": 1e-6},
            "shadow": {"count": 1},
            "attacks": {"threshold": {}, "lira": {}},  # fitted without a second reference
            "decoder": ["shadow", "adapted"],
        },
        "experiments": {
            "audit": {"target": {"checkpoint": str(tmp_path / "enc.safetensors"), "format": "timm"}}
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = _snakemake(tmp_path, "-n", "--quiet", "rules")
    assert run.returncode == 0, run.stderr[-3000:]
    counts = {
        line.split()[0]: int(line.split()[1])
        for line in run.stdout.splitlines()
        if len(line.split()) == 2 and line.split()[1].isdigit()
    }
    assert counts["import_target"] == 1
    assert counts["pretrain"] == 1  # shadow0 only: the target is imported, not trained


def test_workflow_checks_stated_heads_against_a_released_decoder(tmp_path):
    """The import job of a release with its decoder scores the stated heads and eps on the
    first target_member images (an untrained release here: a near tie, so it passes) and
    records the outcome in the target's sidecar."""
    spec = model_spec(_exp(tmp_path / "release.pth", ["released"], "mae"))
    torch.manual_seed(0)
    release = {
        k.removeprefix("encoder.").removeprefix("decoder."): v
        for k, v in build_model(spec).state_dict().items()
    }
    torch.save({"model": release}, tmp_path / "release.pth")
    config = {
        "defaults": {
            "dataset": {"name": "digits", "img_size": 16},
            "model": {**MODEL, "norm_eps": 1e-6, "norm_pix_loss": False},
            "shadow": {"count": 1},
            "attacks": {"threshold": {}, "lira": {}},  # fitted without a second reference
            "decoder": ["released"],
        },
        "experiments": {
            "audit": {"target": {"checkpoint": str(tmp_path / "release.pth"), "format": "mae"}}
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    target = "results/audit/models/target-imported/model.safetensors"
    run = _snakemake(tmp_path, "--quiet", "all", "--", target)
    assert run.returncode == 0, run.stderr[-3000:]
    sidecar = json.loads((tmp_path / target).with_suffix(".json").read_text())
    check = sidecar["info"]["imported"]["plausibility"]
    assert check["ran"] and check["outcome"] == "passed" and check["images"] == 32
    assert check["stated"] == {"num_heads": 2, "decoder_num_heads": 2, "norm_eps": 1e-6}
    log = (tmp_path / "results/logs/audit/pretrain/import_target.log").read_text()
    assert "plausibility check of target checkpoint" in log and "<- stated" in log


def test_encoder_only_modes_ignore_a_mimia_target_decoder_unlike_the_config(tmp_path):
    ckpt = tmp_path / "target" / "model.safetensors"
    released = _exp(ckpt, ["released"], "mimia", decoder_embed_dim=48, decoder_depth=2)
    torch.manual_seed(0)
    save_model(build_model(model_spec(released)), ckpt, {"decoder_released": True})

    def config(decoder: list[str]) -> dict:
        target = {"checkpoint": str(ckpt), "format": "mimia"}
        audit = {"dataset": {"img_size": 16}, "target": target}
        return {
            "defaults": {"model": {"recipe": "mae", **MODEL}},
            "experiments": {"audit": audit | {"decoder": decoder}},
        }

    # Scored with the shadow's or the adapted decoder, the target's own is not compared ...
    resolve_experiments(config(["shadow", "adapted"]))
    info = import_stage(
        _exp(ckpt, ["shadow", "adapted"], "mimia"), ckpt, tmp_path / "out" / "model.safetensors"
    )
    assert info["decoder_released"] and info["plausibility"]["outcome"] == "skipped"
    # ... but with decoder 'released' it is the audited decoder, and must be the section's.
    with pytest.raises(ValueError, match=r"model\.decoder_embed_dim: checkpoint 48, config 32"):
        resolve_experiments(config(["released"]))
