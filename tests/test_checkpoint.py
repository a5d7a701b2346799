"""Importing released weights (timm, official MAE, mimia) and refusing unsafe pickles."""

import argparse
import json
import os
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
    read_weights,
    save_model,
)
from mimia.models.spec import ModelSpec, spec_differences


class NotATensor:
    """Any class: unpickling it would mean running code named by the file."""


class MakesADirectory:
    """Unpickling this calls os.mkdir: what a malicious checkpoint does with any callable."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


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


def _model(spec, seed=0):
    torch.manual_seed(seed)
    model = build_model(spec).eval()
    _randomise(model, seed)
    return model


@pytest.fixture
def mae(tiny_spec):
    return _model(tiny_spec)


def _same_state(a, b):
    sb = b.state_dict()
    for k, v in a.state_dict().items():
        assert torch.equal(v, sb[k]), k


def _losses(model, spec):
    imgs, mask = _batch(spec)
    with torch.no_grad():
        return model(imgs, mask)


TINY_GIVEN = {"num_heads": 2, "decoder_num_heads": 2, "norm_eps": 1e-6, "norm_pix_loss": False}


def test_official_mae_round_trip(mae, tiny_spec, tmp_path, capsys):
    path = tmp_path / "mae_visualize_tiny.pth"
    torch.save({"model": _official_state_dict(mae)}, path)
    model, info = import_mae_checkpoint(path, **TINY_GIVEN)
    assert info["decoder_released"] is True and info["format"] == "mae"
    sources = info["spec_sources"]
    assert sources["num_heads"] == sources["norm_eps"] == sources["norm_pix_loss"] == "given"
    assert sources["depth"] == "weights blocks.N"
    assert sources["decoder_depth"] == "weights decoder_blocks.N"
    # The job's log says where each field came from.
    log = capsys.readouterr().err
    assert f"architecture of mae checkpoint {path}:" in log
    assert "model.encoder_overrides.depth = 2" in log and "<- weights blocks.N" in log
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
        "norm_eps",
        "mean",
        "std",
    ):
        assert getattr(model.spec, field) == getattr(tiny_spec, field), field
    _same_state(mae, model)
    assert torch.equal(_losses(mae, tiny_spec)[0], _losses(model, tiny_spec)[0])
    # The same through the entry point, with an explicit spec.
    model2, info2 = import_checkpoint(path, "mae", spec=tiny_spec)
    _same_state(mae, model2)
    assert info2["sha256"] == info["sha256"] and info2["source"] == str(path)
    assert info2["spec_sources"]["num_heads"] == "given (spec)"
    with pytest.raises(TypeError, match="either spec or num_heads"):
        import_checkpoint(path, "mae", spec=tiny_spec, num_heads=2)


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
    # Without a spec, the decoder fields are the fresh decoder's defaults, and say so.
    inferred, info = import_checkpoint(path, "mae", num_heads=2, norm_eps=1e-6)
    assert "fresh decoder" in info["spec_sources"]["decoder_num_heads"]
    assert inferred.spec.decoder_embed_dim == ModelSpec().decoder_embed_dim


def _vit_b_shapes(device="meta") -> dict[str, torch.Tensor]:
    """The shapes of an official ViT-B/16 MAE state dict (no memory: meta tensors)."""
    spec = ModelSpec(encoder="vit_base_patch16_224")
    with torch.device(device):
        model = build_model(spec)
    return {
        k.removeprefix("encoder.").removeprefix("decoder."): v
        for k, v in model.state_dict().items()
    }


def test_shape_inference_refuses_to_guess_what_weights_do_not_record():
    sd = _vit_b_shapes()
    # A standard width used to imply the standard heads; it no longer does.
    with pytest.raises(ValueError) as err:
        infer_spec(sd)
    msg = str(err.value)
    for field in ("num_heads", "decoder_num_heads", "norm_eps", "norm_pix_loss"):
        assert field in msg
    assert "model.encoder_overrides.num_heads" in msg and "model.norm_eps" in msg
    assert "no official args" in msg
    spec, sources = infer_spec(
        sd, num_heads=12, decoder_num_heads=16, norm_eps=1e-6, norm_pix_loss=False
    )
    assert spec.encoder == "vit_base_patch16_224"
    assert spec.encoder_overrides == {
        "embed_dim": 768,
        "depth": 12,
        "num_heads": 12,
        "mlp_ratio": 4.0,
    }
    assert (spec.img_size, spec.patch_size) == (224, 16)
    assert (spec.decoder_embed_dim, spec.decoder_depth, spec.decoder_num_heads) == (512, 8, 16)
    assert sources["num_heads"] == "given" and sources["embed_dim"].startswith("weights")
    # Official args name the architecture: heads and eps are read from args.model.
    args = argparse.Namespace(model="mae_vit_base_patch16", norm_pix_loss=True, input_size=224)
    spec, sources = infer_spec(sd, args=args)
    assert spec.encoder_overrides["num_heads"] == 12 and spec.decoder_num_heads == 16
    assert spec.norm_eps == 1e-6 and spec.norm_pix_loss is True
    assert sources["num_heads"] == "args.model='mae_vit_base_patch16' (models_mae.py)"
    assert sources["norm_pix_loss"] == "args.norm_pix_loss"
    assert sources["depth"] == "weights blocks.N; args.model='mae_vit_base_patch16' (models_mae.py)"
    assert sources["img_size"].endswith("args.input_size")
    # What args say cannot be overruled by a given value.
    with pytest.raises(ValueError, match=r"norm_pix_loss: args.norm_pix_loss says True, given"):
        infer_spec(sd, args=args, norm_pix_loss=False)
    with pytest.raises(ValueError, match=r"args.model='mae_vit_large_patch16'.* says 24"):
        infer_spec(sd, args=argparse.Namespace(model="mae_vit_large_patch16"))
    sd["patch_embed.proj.weight"] = torch.empty(100, 3, 16, 16, device="meta")
    with pytest.raises(ValueError, match="cannot tell num_heads"):
        infer_spec({k: v for k, v in sd.items() if not k.startswith(("decoder", "mask"))})


def test_standard_width_with_other_heads_imports_only_when_stated(tmp_path):
    # Width 192 is ViT-Ti's, whose heads are 3; this model has 6.
    spec = ModelSpec(
        encoder="vit_tiny_patch16_224",
        encoder_overrides={"depth": 1, "num_heads": 6},
        img_size=16,
        patch_size=4,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
    )
    original = _model(spec)
    path = tmp_path / "six_heads.pth"
    torch.save({"model": _official_state_dict(original)}, path)
    rest = {"decoder_num_heads": 2, "norm_eps": 1e-6, "norm_pix_loss": False}
    with pytest.raises(ValueError, match="cannot tell num_heads"):
        import_mae_checkpoint(path, **rest)
    right, _ = import_mae_checkpoint(path, num_heads=6, **rest)
    wrong, _ = import_mae_checkpoint(path, num_heads=3, **rest)
    _, pred = _losses(original, spec)
    assert torch.equal(_losses(right, spec)[1], pred)
    # The same weights with ViT-Ti's heads compute another function.
    assert (_losses(wrong, spec)[1] - pred).abs().max() > 1e-2


def test_layer_norm_eps_round_trips_and_is_never_assumed(tiny_spec, tmp_path):
    spec = replace(tiny_spec, norm_eps=1e-5)
    original = _model(spec)
    norms = [m for m in original.modules() if isinstance(m, torch.nn.LayerNorm)]
    # encoder: 2 per block + final; decoder: 2 per block + final
    assert len(norms) == 2 * 2 + 1 + 2 * 1 + 1 and all(m.eps == 1e-5 for m in norms)
    path = tmp_path / "eps1e-5.pth"
    torch.save({"model": _official_state_dict(original)}, path)
    given = {k: v for k, v in TINY_GIVEN.items() if k != "norm_eps"}
    with pytest.raises(ValueError, match="cannot tell norm_eps") as err:
        import_mae_checkpoint(path, **given)
    assert "model.norm_eps" in str(err.value)
    stated, info = import_mae_checkpoint(path, norm_eps=1e-5, **given)
    assert stated.spec.norm_eps == 1e-5 and info["spec_sources"]["norm_eps"] == "given"
    loss, pred = _losses(original, spec)
    assert torch.equal(_losses(stated, spec)[0], loss)
    assert torch.equal(_losses(stated, spec)[1], pred)
    # The timm default would compute another function from the same weights.
    assumed, _ = import_mae_checkpoint(path, norm_eps=1e-6, **given)
    assert not torch.equal(_losses(assumed, spec)[1], pred)
    # Through the entry point: the config's spec states it.
    via_config, _ = import_checkpoint(path, "mae", spec=spec)
    assert torch.equal(_losses(via_config, spec)[0], loss)
    # And mimia's own format keeps it.
    save_model(stated, tmp_path / "model.safetensors")
    mine, _ = import_checkpoint(tmp_path / "model.safetensors", "mimia")
    assert mine.spec.norm_eps == 1e-5 and torch.equal(_losses(mine, spec)[0], loss)


def _official_training_checkpoint(mae, path, **args):
    """What facebookresearch/mae main_pretrain.py's misc.save_model writes each epoch."""
    trained = build_model(mae.spec)
    trained.load_state_dict(mae.state_dict())
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-4, betas=(0.9, 0.95))
    trained(*_batch(mae.spec))[0].mean().backward()
    optimizer.step()
    namespace = argparse.Namespace(
        batch_size=64,
        epochs=400,
        accum_iter=1,
        model="mae_vit_large_patch16",
        input_size=224,
        mask_ratio=0.75,
        norm_pix_loss=False,
        weight_decay=0.05,
        lr=1.5e-4,
        blr=1.5e-4,
        min_lr=0.0,
        warmup_epochs=40,
        data_path="/datasets01/imagenet_full_size/061417/",
        output_dir="./output_dir",
        log_dir="./output_dir",
        device="cuda",
        seed=0,
        resume="",
        start_epoch=0,
        num_workers=10,
        pin_mem=True,
        world_size=8,
        local_rank=-1,
        dist_on_itp=False,
        dist_url="env://",
        rank=0,
        gpu=0,
        distributed=True,
        dist_backend="nccl",
    )
    vars(namespace).update(args)
    torch.save(
        {
            "model": _official_state_dict(mae),
            "optimizer": optimizer.state_dict(),
            "epoch": 399,
            # torch.cuda.amp.GradScaler.state_dict(), as NativeScalerWithGradNormCount saves it
            "scaler": {
                "scale": 65536.0,
                "growth_factor": 2.0,
                "backoff_factor": 0.5,
                "growth_interval": 2000,
                "_growth_tracker": 17,
            },
            "args": namespace,
        },
        path,
    )


def test_official_training_checkpoint_imports_directly(tiny_spec, tmp_path, capsys):
    spec = replace(tiny_spec, norm_pix_loss=True)
    original = _model(spec)
    path = tmp_path / "checkpoint-399.pth"
    # A fork's model name: mimia cannot read heads from it, but the flags it can.
    _official_training_checkpoint(
        original, path, model="mae_vit_tiny_patch4", input_size=16, norm_pix_loss=True
    )
    obj = read_weights(path)
    assert isinstance(obj["args"], argparse.Namespace) and obj["epoch"] == 399
    model, info = import_mae_checkpoint(path, num_heads=2, decoder_num_heads=2, norm_eps=1e-6)
    assert spec_differences(model.spec, spec) == [] and model.spec.norm_pix_loss is True
    assert info["spec_sources"]["norm_pix_loss"] == "args.norm_pix_loss"
    assert info["spec_sources"]["img_size"] == "weights pos_embed and patch size; args.input_size"
    assert info["official_args"]["mask_ratio"] == 0.75 and info["epoch"] == 399
    assert info["official_args"]["model"] == "mae_vit_tiny_patch4"
    json.dumps(info)
    assert "model.norm_pix_loss = True" in capsys.readouterr().err
    loss, pred = _losses(original, spec)
    assert torch.equal(_losses(model, spec)[0], loss) and torch.equal(_losses(model, spec)[1], pred)
    # A config whose model section disagrees with the args is refused, the checkpoint winning.
    with pytest.raises(ValueError, match="norm_pix_loss: checkpoint True") as err:
        import_checkpoint(path, "mae", spec=tiny_spec)
    assert "it wins" in str(err.value) and "args.norm_pix_loss" in str(err.value)
    assert import_checkpoint(path, "mae", spec=spec)[0].spec == spec
    # args.model naming an official architecture that the weights are not: refused.
    _official_training_checkpoint(original, path, model="mae_vit_base_patch16", input_size=16)
    with pytest.raises(ValueError, match="contradicts itself") as err:
        import_mae_checkpoint(path)
    assert "embed_dim: weights patch_embed.proj.weight says 32" in str(err.value)


def test_official_training_checkpoint_with_code_executing_args_is_refused(tiny_spec, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint-1.pth"
    torch.save(
        {"model": _official_state_dict(_model(tiny_spec)), "args": MakesADirectory(marker)}, path
    )
    with pytest.raises(CheckpointRefusedError) as err:
        import_checkpoint(path, "mae", spec=tiny_spec)
    assert not marker.exists()  # nothing ran
    # torch's own reason is in the message, whole.
    assert "Trying to load unsupported GLOBAL posix.mkdir whose module posix is blocked" in str(
        err.value
    )
    assert "convert it once" in str(err.value)


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
    # Entry point, spec inferred from shapes: heads and eps must be stated.
    with pytest.raises(ValueError, match="cannot tell num_heads, norm_eps"):
        import_checkpoint(path, "timm")
    model2, info2 = import_checkpoint(path, "timm", num_heads=2, norm_eps=1e-6)
    _same_state(model.encoder, model2.encoder)
    assert "ImageNet default" in info2["spec_sources"]["mean"]
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
    with pytest.raises(ValueError, match=r"dataset\.img_size: checkpoint 16 \(weights pos_embed"):
        import_timm_encoder(path, replace(tiny_spec, img_size=32))
    deeper = replace(tiny_spec, encoder_overrides={**tiny_spec.encoder_overrides, "depth": 3})
    with pytest.raises(ValueError, match=r"encoder_overrides\.depth: checkpoint 2 .*config 3"):
        import_timm_encoder(path, deeper)
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
        msg = str(err.value)
        assert "safetensors" in msg
        # torch's reason, whole: which global, and that it is not allowed by default.
        assert "Unsupported global: GLOBAL test_checkpoint.NotATensor was not an allowed" in msg
        assert "weights_only` set to `False` will likely succeed" not in msg
    assert issubclass(CheckpointRefusedError, ValueError)
    # Allowing Namespace is scoped to mimia's reads: torch's own allow-list is unchanged.
    assert argparse.Namespace not in torch.serialization.get_safe_globals()


def test_corrupt_pickles_name_the_file(mae, tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model": _official_state_dict(mae)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*model\.pth.*central directory"):
        read_weights(path)
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*model\.pth") as err:
        read_weights(path)
    assert not isinstance(err.value, CheckpointRefusedError)


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


def test_mimia_format_through_entry_point(mae, tmp_path, capsys):
    path = tmp_path / "model.safetensors"
    save_model(mae, path, info={"decoder_released": False, "seed": 3})
    model, info = import_checkpoint(path, "mimia")
    _same_state(mae, model)
    assert info["decoder_released"] is False and info["sidecar_info"]["seed"] == 3
    assert info["spec_sources"]["depth"] == f"sidecar {path.with_suffix('.json')}"
    assert f"architecture of mimia checkpoint {path}" in capsys.readouterr().err
    json.dumps(info)
    with pytest.raises(ValueError, match=r"model\.decoder_depth: checkpoint 1, config 2"):
        import_checkpoint(path, "mimia", spec=replace(mae.spec, decoder_depth=2))
