"""Importing released weights (timm, official MAE, mimia) and refusing unsafe pickles."""

import json
from dataclasses import replace

import pytest
import timm
import torch
from safetensors.torch import save_file

from mimia.masking import random_masks
from mimia.models import build_model
from mimia.models.checkpoint import (
    FORMATS,
    CheckpointRefusedError,
    import_checkpoint,
    import_mae_checkpoint,
    import_timm_encoder,
    infer_spec,
    save_model,
)


class NotATensor:
    """Any class: unpickling it would mean running code named by the file."""


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _official_state_dict(model) -> dict[str, torch.Tensor]:
    """A mimia MAE's weights under facebookresearch/mae's key names."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("encoder."):
            sd[k.removeprefix("encoder.")] = v.clone()
        else:
            sd[k.removeprefix("decoder.")] = v.clone()
    assert "mask_token" in sd and "decoder_pred.weight" in sd and "blocks.0.attn.qkv.weight" in sd
    return sd


def _batch(spec, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(n, spec.in_chans, spec.img_size, spec.img_size, generator=g)
    return imgs, random_masks(n, spec.num_patches, 0.75, generator=g)


@pytest.fixture
def mae(tiny_spec):
    torch.manual_seed(0)
    model = build_model(tiny_spec).eval()
    _randomise(model)
    return model


def _same_state(a, b):
    sb = b.state_dict()
    for k, v in a.state_dict().items():
        assert torch.equal(v, sb[k]), k


def test_official_mae_round_trip(mae, tiny_spec, tmp_path):
    path = tmp_path / "mae_visualize_tiny.pth"
    torch.save({"model": _official_state_dict(mae)}, path)
    model, info = import_mae_checkpoint(path, num_heads=2, decoder_num_heads=2)
    assert info["decoder_released"] is True and info["format"] == "mae"
    assert "norm_pix_loss" in info["assumed"] and "num_heads" not in info["assumed"]
    # The inferred spec is the original architecture.
    assert model.spec.encoder_overrides == {
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "mlp_ratio": 4.0,
    }
    for field in (
        "img_size",
        "patch_size",
        "in_chans",
        "decoder_embed_dim",
        "decoder_depth",
        "decoder_num_heads",
        "norm_pix_loss",
        "mean",
        "std",
    ):
        assert getattr(model.spec, field) == getattr(tiny_spec, field), field
    _same_state(mae, model)
    imgs, mask = _batch(tiny_spec)
    with torch.no_grad():
        assert torch.equal(mae(imgs, mask)[0], model(imgs, mask)[0])
    # The same through the entry point, with an explicit spec.
    model2, info2 = import_checkpoint(path, "mae", spec=tiny_spec)
    _same_state(mae, model2)
    assert info2["sha256"] == info["sha256"] and info2["source"] == str(path)


def test_official_mae_encoder_only(mae, tiny_spec, tmp_path):
    sd = {
        k: v
        for k, v in _official_state_dict(mae).items()
        if not k.startswith(("decoder_", "mask_token"))
    }
    path = tmp_path / "mae_pretrain_tiny.safetensors"
    save_file(sd, path)
    model, info = import_checkpoint(path, "mae", spec=tiny_spec)
    assert info["decoder_released"] is False
    _same_state(mae.encoder, model.encoder)
    imgs, mask = _batch(tiny_spec)
    with torch.no_grad():
        x = mae.normalize(imgs)
        assert torch.equal(mae.encode(x, mask), model.encode(x, mask))
    # The fresh decoder is seeded: the same import twice gives the same model.
    again, _ = import_checkpoint(path, "mae", spec=tiny_spec)
    _same_state(model, again)


def test_official_mae_shape_inference_defaults():
    """Heads come from the standard sizes: ViT-B encoder, MAE's 512-d decoder."""
    sd = {
        "patch_embed.proj.weight": torch.zeros(768, 3, 16, 16),
        "pos_embed": torch.zeros(1, 197, 768),
        **{f"blocks.{i}.mlp.fc1.weight": torch.zeros(3072, 768) for i in range(12)},
        "blocks.0.attn.qkv.bias": torch.zeros(3 * 768),
        "decoder_embed.weight": torch.zeros(512, 768),
        **{f"decoder_blocks.{i}.mlp.fc1.weight": torch.zeros(2048, 512) for i in range(8)},
    }
    spec, assumed = infer_spec(sd)
    assert spec.encoder == "vit_base_patch16_224"
    assert spec.encoder_overrides == {
        "embed_dim": 768,
        "depth": 12,
        "num_heads": 12,
        "mlp_ratio": 4.0,
    }
    assert (spec.img_size, spec.patch_size) == (224, 16)
    assert (spec.decoder_embed_dim, spec.decoder_depth, spec.decoder_num_heads) == (512, 8, 16)
    assert set(assumed) == {"num_heads", "decoder_num_heads", "norm_pix_loss"}
    sd["patch_embed.proj.weight"] = torch.zeros(100, 3, 16, 16)
    with pytest.raises(ValueError, match="num_heads for a non-standard width embed_dim=100"):
        infer_spec(sd)


def _timm_vit(spec, num_classes=0):
    torch.manual_seed(1)
    vit = timm.create_model(
        spec.encoder,
        pretrained=False,
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        num_classes=num_classes,
        global_pool="token",
        **spec.encoder_overrides,
    ).eval()
    _randomise(vit, seed=2)
    return vit


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_encoder_import(tiny_spec, tmp_path, suffix):
    vit = _timm_vit(tiny_spec, num_classes=10)  # with a classifier head, which is ignored
    path = tmp_path / f"vit{suffix}"
    sd = {k: v.contiguous() for k, v in vit.state_dict().items()}
    save_file(sd, path) if suffix == ".safetensors" else torch.save(sd, path)
    model, info = import_timm_encoder(path, tiny_spec)
    assert info["decoder_released"] is False and info["format"] == "timm"
    assert info["ignored_keys"] == ["head.bias", "head.weight"]
    imgs, _ = _batch(tiny_spec)
    x = model.normalize(imgs)
    visible = torch.zeros(imgs.shape[0], tiny_spec.num_patches, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x, visible), vit.forward_features(x))
    # Entry point, spec inferred from shapes (heads given: 32-d is not a standard width).
    model2, _ = import_checkpoint(path, "timm", num_heads=2)
    _same_state(model.encoder, model2.encoder)
    # A SimMIM model takes the same encoder; its mask token and head stay fresh.
    simmim, info = import_timm_encoder(path, replace(tiny_spec, recipe="simmim"))
    _same_state(model.encoder, simmim.encoder)
    assert info["decoder_released"] is False


def test_timm_encoder_import_refuses_mismatches(tiny_spec, tmp_path):
    sd = {k: v.contiguous() for k, v in _timm_vit(tiny_spec).state_dict().items()}
    path = tmp_path / "vit.safetensors"
    save_file({**sd, "blocks.0.attn.extra": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"unexpected keys: blocks\.0\.attn\.extra"):
        import_timm_encoder(path, tiny_spec)
    save_file({k: v for k, v in sd.items() if k != "norm.weight"}, path)
    with pytest.raises(ValueError, match=r"missing keys: norm\.weight"):
        import_timm_encoder(path, tiny_spec)
    save_file(sd, path)
    with pytest.raises(ValueError, match=r"shape mismatch: pos_embed: checkpoint \(1, 17, 32\)"):
        import_timm_encoder(path, replace(tiny_spec, img_size=32))
    # A fine-tuned classifier (fc_norm, no final norm) is named as such.
    ft = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    save_file({**ft, "fc_norm.weight": sd["norm.weight"], "fc_norm.bias": sd["norm.bias"]}, path)
    with pytest.raises(ValueError, match="fine-tuned classifier"):
        import_timm_encoder(path, tiny_spec)


def test_pickles_needing_arbitrary_objects_are_refused(mae, tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": _official_state_dict(mae), "args": NotATensor()}, path)
    for fmt in ("mae", "timm"):
        with pytest.raises(CheckpointRefusedError, match="is refused") as err:
            import_checkpoint(path, fmt, spec=mae.spec)
        assert "NotATensor" in str(err.value) and "safetensors" in str(err.value)
    assert issubclass(CheckpointRefusedError, ValueError)


def test_entry_point_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown checkpoint format 'onnx'.*'mimia', 'timm'"):
        import_checkpoint(tmp_path, "onnx")
    assert set(FORMATS) == {"mimia", "timm", "mae", "hf"}
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth"):
        import_checkpoint(missing, "mae")
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"")
    with pytest.raises(ValueError, match=r"expected \.safetensors"):
        import_checkpoint(odd, "timm")


def test_mimia_format_through_entry_point(mae, tmp_path):
    path = tmp_path / "model.safetensors"
    save_model(mae, path, info={"decoder_released": False, "seed": 3})
    model, info = import_checkpoint(path, "mimia")
    _same_state(mae, model)
    assert info["decoder_released"] is False and info["sidecar_info"]["seed"] == 3
    json.dumps(info)
    with pytest.raises(ValueError, match="decoder_depth"):
        import_checkpoint(path, "mimia", spec=replace(mae.spec, decoder_depth=2))
