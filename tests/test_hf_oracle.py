"""HuggingFace's ViTMAEForPreTraining as an oracle for mimia's MAE and its HF importer.

A tiny HF model with random weights (position embeddings and layer norms included) is saved with
``save_pretrained``, imported by :func:`import_hf_vitmae` and run on the same pixels and the
same masking noise: losses, masks, latents and predictions must agree in float32.
"""

import json
import shutil

import pytest
import torch

from mimia.masking import mask_from_noise
from mimia.models.checkpoint import hf_spec, import_checkpoint, import_hf_vitmae
from mimia.models.pos_embed import sincos_2d

transformers = pytest.importorskip("transformers")

MASK_RATIO = 0.75
CONFIG = dict(
    image_size=32,
    patch_size=4,
    num_channels=3,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=256,
    decoder_hidden_size=32,
    decoder_num_hidden_layers=2,
    decoder_num_attention_heads=4,
    decoder_intermediate_size=128,
    layer_norm_eps=1e-6,
    hidden_act="gelu",
    qkv_bias=True,
    mask_ratio=MASK_RATIO,
)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, so a mis-mapped or transposed tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layernorm" in name or "norm" in name.rsplit(".", 2)[-2]:
                p.copy_((1.0 + 0.2 * noise) if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def _hf_model(tmp_path, norm_pix_loss=False, attn="eager", seed=0, **overrides):
    cfg = transformers.ViTMAEConfig(**{**CONFIG, **overrides}, norm_pix_loss=norm_pix_loss)
    cfg._attn_implementation = attn
    model = transformers.ViTMAEForPreTraining(cfg)
    _randomise(model, seed)
    model.eval()
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    return model, folder


def _inputs(spec, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, spec.img_size, spec.img_size, generator=g)
    noise = torch.rand(batch, spec.num_patches, generator=g)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    # mimia normalises inside the model: these images normalise back to pixel_values.
    return pixel_values, noise, pixel_values * std + mean


@pytest.mark.parametrize(
    ("norm_pix_loss", "attn"), [(False, "eager"), (True, "eager"), (False, "sdpa"), (True, "sdpa")]
)
def test_imported_hf_model_matches_huggingface(tmp_path, norm_pix_loss, attn):
    hf, folder = _hf_model(tmp_path, norm_pix_loss=norm_pix_loss, attn=attn)
    model, info = import_hf_vitmae(folder)
    assert info["decoder_released"] and info["format"] == "hf"
    assert model.spec.norm_pix_loss is norm_pix_loss
    pixel_values, noise, imgs = _inputs(model.spec)
    mask = mask_from_noise(noise, MASK_RATIO)

    with torch.no_grad():
        out = hf(pixel_values=pixel_values, noise=noise)
        loss, pred = model(imgs, mask)
        x = model.normalize(imgs)
        latent = model.encode(x, mask)
    torch.testing.assert_close(x, pixel_values, rtol=0, atol=1e-6)

    # Same masks from the same noise.
    assert torch.equal(out.mask.bool(), mask)
    # Per-sample masked MSE, computed from HF's logits and mask; HF's loss is the batch mean.
    target = hf.patchify(pixel_values)
    if norm_pix_loss:
        mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mu) / (var + 1.0e-6) ** 0.5
    per_patch = ((out.logits - target) ** 2).mean(-1)
    hf_per_sample = (per_patch * out.mask).sum(-1) / out.mask.sum(-1)
    torch.testing.assert_close(loss, hf_per_sample, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss.mean(), out.loss, rtol=0, atol=1e-5)
    # Predictions, on masked patches and everywhere.
    torch.testing.assert_close(pred[mask], out.logits[mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(pred, out.logits, rtol=0, atol=1e-5)
    # Encoder latents: HF keeps visible tokens in noise order, mimia in patch order.
    hf_latent = hf.vit(pixel_values=pixel_values, noise=noise).last_hidden_state.detach()
    n_keep = latent.shape[1] - 1
    ids_keep = torch.argsort(noise, dim=1)[:, :n_keep]
    order = torch.argsort(ids_keep, dim=1)
    hf_sorted = torch.gather(hf_latent[:, 1:], 1, order.unsqueeze(-1).expand_as(latent[:, 1:]))
    torch.testing.assert_close(latent[:, :1], hf_latent[:, :1], rtol=0, atol=1e-5)
    torch.testing.assert_close(latent[:, 1:], hf_sorted, rtol=0, atol=1e-5)


def test_import_checkpoint_hf_entry_point_and_spec(tmp_path):
    _, folder = _hf_model(tmp_path)
    model, info = import_checkpoint(folder, "hf")
    spec = model.spec
    assert spec.encoder_overrides == {"embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 4.0}
    assert (spec.img_size, spec.patch_size, spec.in_chans) == (32, 4, 3)
    assert (spec.decoder_embed_dim, spec.decoder_depth, spec.decoder_num_heads) == (32, 2, 4)
    assert info["source"] == str(folder) and len(info["sha256"]) == 64
    assert info["weights_file"].endswith("model.safetensors")
    json.dumps(info)  # can go into a mimia sidecar
    # A given spec must agree on the architecture; its mean/std are used.
    from dataclasses import replace

    mine = replace(spec, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    model2, _ = import_checkpoint(folder, "hf", spec=mine)
    assert model2.spec == mine
    with pytest.raises(ValueError, match="decoder_depth"):
        import_checkpoint(folder, "hf", spec=replace(spec, decoder_depth=3))


def test_hf_position_embedding_layout_matches_mimia():
    """HF rotates its sin-cos halves to the original MAE's [w | h] layout, as mimia builds it."""
    from transformers.models.vit_mae.modeling_vit_mae import (
        build_2d_sinusoidal_position_embedding,
    )

    pos = build_2d_sinusoidal_position_embedding(8, 8, 64, cls_token=True)
    half = pos.shape[-1] // 2
    pos = torch.cat([pos[..., half:], pos[..., :half]], dim=-1)
    torch.testing.assert_close(pos, torch.from_numpy(sincos_2d(64, 8, cls_token=True)).float())


def _edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_hf_config_checks(tmp_path):
    _, folder = _hf_model(tmp_path)
    _edit_config(folder, layer_norm_eps=1e-12)  # what facebook/vit-mae-* configs say
    model, info = import_hf_vitmae(folder)
    assert model.spec.norm_eps == 1e-12
    assert info["spec_sources"]["norm_eps"] == "config.json layer_norm_eps"
    assert all(m.eps == 1e-12 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    _edit_config(folder, layer_norm_eps=1e-6, hidden_act="gelu_new")
    with pytest.raises(ValueError, match="hidden_act 'gelu_new'"):
        import_hf_vitmae(folder)
    assert hf_spec({"image_size": [32, 32], "patch_size": 4, "layer_norm_eps": 1e-6}).img_size == 32
    # A key config.json leaves out takes ViTMAEConfig's default, as transformers reads it.
    assert hf_spec({}).norm_eps == transformers.ViTMAEConfig().layer_norm_eps
    # Pixel statistics live outside HF models: a preprocessor config states them.
    _edit_config(folder, hidden_act="gelu")
    stats = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}
    (folder / "preprocessor_config.json").write_text(json.dumps(stats))
    model, info = import_hf_vitmae(folder)
    assert (model.spec.mean, model.spec.std) == ((0.5,) * 3, (0.25,) * 3)
    assert info["spec_sources"]["mean"].startswith("preprocessor_config.json")
    with pytest.raises(ValueError, match=r"preprocessor_config.json says image_mean \[0.5"):
        import_hf_vitmae(folder, mean=(0.4, 0.4, 0.4), std=(0.25,) * 3)


def test_imported_hf_model_with_other_layer_norm_eps_matches_huggingface(tmp_path):
    """layer_norm_eps is the model's norm_eps exactly, so the oracle agrees at any eps."""
    hf, folder = _hf_model(tmp_path, layer_norm_eps=1e-2)
    model, _ = import_hf_vitmae(folder)
    assert model.spec.norm_eps == 1e-2
    pixel_values, noise, imgs = _inputs(model.spec)
    mask = mask_from_noise(noise, MASK_RATIO)
    with torch.no_grad():
        out = hf(pixel_values=pixel_values, noise=noise)
        _, pred = model(imgs, mask)
    torch.testing.assert_close(pred, out.logits, rtol=0, atol=1e-5)


def test_hf_legacy_decoder_names_and_bin_weights(tmp_path):
    """The hub's layout (decoder.decoder_layers.N, pytorch_model.bin) imports the same."""
    from safetensors.torch import load_file

    _, folder = _hf_model(tmp_path)
    reference, _ = import_hf_vitmae(folder)
    sd = load_file(folder / "model.safetensors")
    renamed = {
        k.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."): v
        for k, v in sd.items()
    }
    assert any(k.startswith("decoder.decoder_layers.") for k in renamed)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(folder / "config.json", legacy / "config.json")
    torch.save(renamed, legacy / "pytorch_model.bin")
    model, info = import_hf_vitmae(legacy)
    assert info["weights_file"].endswith("pytorch_model.bin")
    for k, v in reference.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    # Encoder only (a bare ViTMAEModel): the decoder is not released.
    enc_only = tmp_path / "enc"
    enc_only.mkdir()
    shutil.copy(folder / "config.json", enc_only / "config.json")
    torch.save(
        {k.removeprefix("vit."): v for k, v in sd.items() if k.startswith("vit.")},
        enc_only / "pytorch_model.bin",
    )
    model, info = import_hf_vitmae(enc_only)
    assert info["decoder_released"] is False
    for k, v in reference.encoder.state_dict().items():
        assert torch.equal(v, model.encoder.state_dict()[k]), k


def test_hf_missing_position_embeddings_get_sincos(tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = _hf_model(tmp_path)
    sd = load_file(folder / "model.safetensors")
    del sd["vit.embeddings.position_embeddings"], sd["decoder.decoder_pos_embed"]
    save_file(sd, folder / "model.safetensors")
    model, info = import_hf_vitmae(folder)
    assert info["sincos_filled"] == ["encoder.pos_embed", "decoder.decoder_pos_embed"]
    expected = torch.from_numpy(sincos_2d(64, 8, cls_token=True)).float().unsqueeze(0)
    assert torch.equal(model.encoder.pos_embed, expected)
    with pytest.raises(NotADirectoryError, match="save_pretrained folder"):
        import_hf_vitmae(folder / "config.json")
