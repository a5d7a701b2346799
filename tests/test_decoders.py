import polars as pl
import pytest
import torch

from mimia.data.shards import write_tar_shard
from mimia.data.sources import load_source
from mimia.data.splits import ROLES, manifest_hash, split_roles
from mimia.models import build_model
from mimia.models.checkpoint import load_model, save_model
from mimia.models.scoring import attach_decoder
from mimia.provenance import write_parquet
from mimia.stages import adapt_decoder as adapt_decoder_stage


def test_attach_decoder_swaps_only_the_decoder(tiny_spec):
    torch.manual_seed(0)
    target, shadow = build_model(tiny_spec), build_model(tiny_spec)
    both = attach_decoder(target, shadow)
    for k, v in both.encoder.state_dict().items():
        assert torch.equal(v, target.encoder.state_dict()[k])
    for k, v in both.decoder.state_dict().items():
        assert torch.equal(v, shadow.decoder.state_dict()[k])


def test_attach_decoder_refuses_mismatched_widths(tiny_spec):
    from dataclasses import replace

    wide = replace(tiny_spec, encoder_overrides={"embed_dim": 64, "depth": 2, "num_heads": 2})
    with pytest.raises(ValueError, match="encoder width 64 differs"):
        attach_decoder(build_model(tiny_spec), build_model(wide))


def test_adaptation_freezes_the_target_encoder_and_reads_only_adversary_data(tiny_spec, tmp_path):
    src = load_source({"name": "digits"})
    sizes = dict.fromkeys(ROLES, 16)
    manifest = split_roles(src.keys, src.content_hashes(), src.labels, sizes, 0, "digits")
    manifest_path = tmp_path / "manifest.parquet"
    write_parquet(manifest, manifest_path, {"manifest_sha256": manifest_hash(manifest)})
    shards = {}
    for role in ROLES:
        shards[role] = tmp_path / f"{role}-000000.tar"
        write_tar_shard(manifest.filter(pl.col("role") == role), src, 16, shards[role])
    torch.manual_seed(0)
    target, shadow = build_model(tiny_spec), build_model(tiny_spec)
    save_model(target, tmp_path / "target.safetensors")
    save_model(shadow, tmp_path / "shadow.safetensors")
    out = tmp_path / "adapted" / "model.safetensors"
    # Every shard is offered, target roles included: only the shadow roles may be read.
    adapt_decoder_stage(
        encoder=tmp_path / "target.safetensors",
        shadow=tmp_path / "shadow.safetensors",
        manifest=manifest_path,
        shards=list(shards.values()),
        weights=out,
        sidecar=out.with_suffix(".json"),
        train_log=tmp_path / "log.parquet",
        model="target-adapted",
        train={"epochs": 3, "batch_size": 8, "blr": 1e-2, "warmup_epochs": 1},
        seed=0,
        runtime={"device": "cpu", "compile": False, "precision": "bf16"},
    )
    adapted = load_model(out)
    for k, v in target.encoder.state_dict().items():
        assert torch.equal(v, adapted.encoder.state_dict()[k]), k
    changed = [
        k
        for k, v in shadow.decoder.state_dict().items()
        if not torch.equal(v, adapted.decoder.state_dict()[k])
    ]
    assert changed, "the decoder was not trained"
    log = pl.read_parquet(tmp_path / "log.parquet")
    assert log.height == 3
    import json

    info = json.loads(out.with_suffix(".json").read_text())["info"]
    assert info["num_train_images"] == 32  # shadow_member + shadow_nonmember, no target image
    assert info["precision"] == "bf16"  # runtime.precision, recorded
