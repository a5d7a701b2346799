"""MAE and SimMIM against hand computations; deterministic masks; spec checks; save/load."""

import json
from dataclasses import replace

import pytest
import timm
import torch
import torch.nn.functional as F

from mimia.masking import deterministic_masks, num_masked, random_masks
from mimia.models import MAE, ModelSpec, SimMIM, build_model
from mimia.models.checkpoint import load_model, save_model
from mimia.models.spec import TIMM_VITS, architecture, spec_differences

B = 4


@pytest.fixture
def simmim_spec(tiny_spec):
    return replace(tiny_spec, recipe="simmim", mask_patch_size=8)


def _model(spec, seed=0):
    torch.manual_seed(seed)
    model = build_model(spec).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # away from the symmetric init, so errors cannot hide in zeros
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _batch(spec, ratio=0.75, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(B, spec.in_chans, spec.img_size, spec.img_size, generator=g)
    mask = random_masks(B, spec.num_patches, ratio, generator=g, block_size=spec.mask_block)
    return imgs, mask


def _patchify_by_unfold(x, p):
    """An independent patchify: unfold gives (c, p, q) per patch; MAE orders (p, q, c)."""
    b, c = x.shape[:2]
    cols = F.unfold(x, kernel_size=p, stride=p)  # [B, C*p*p, L]
    return cols.view(b, c, p, p, -1).permute(0, 4, 2, 3, 1).reshape(b, -1, p * p * c)


@pytest.mark.parametrize("recipe", ["mae", "simmim"])
def test_forward_shapes(tiny_spec, recipe):
    spec = replace(tiny_spec, recipe=recipe, mask_patch_size=8 if recipe == "simmim" else None)
    model = _model(spec)
    imgs, mask = _batch(spec)
    loss, pred = model(imgs, mask)
    assert loss.shape == (B,) and torch.isfinite(loss).all()
    assert pred.shape == (B, spec.num_patches, spec.patch_size**2 * spec.in_chans)
    assert model.reconstruct(imgs, pred).shape == imgs.shape
    assert isinstance(model, MAE if recipe == "mae" else SimMIM)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_mae_loss_is_mse_on_masked_patches(tiny_spec, norm_pix_loss):
    spec = replace(tiny_spec, norm_pix_loss=norm_pix_loss)
    model = _model(spec)
    imgs, mask = _batch(spec)
    with torch.no_grad():
        loss, pred = model(imgs, mask)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    target = _patchify_by_unfold((imgs - mean) / std, spec.patch_size)
    if norm_pix_loss:
        mu = target.mean(-1, keepdim=True)
        var = ((target - mu) ** 2).sum(-1, keepdim=True) / (target.shape[-1] - 1)
        target = (target - mu) / torch.sqrt(var + 1e-6)
    for i in range(B):
        m = mask[i]
        expected = ((pred[i, m] - target[i, m]) ** 2).mean()
        torch.testing.assert_close(loss[i], expected, rtol=1e-5, atol=1e-6)


def test_patchify_round_trip(tiny_spec):
    model = _model(tiny_spec)
    x = torch.randn(B, 3, 16, 16)
    assert torch.equal(model.patchify(x), _patchify_by_unfold(x, 4))
    assert torch.equal(model.unpatchify(model.patchify(x)), x)


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.6])
def test_mae_encoder_sees_only_visible_tokens(tiny_spec, ratio):
    model = _model(tiny_spec)
    imgs, mask = _batch(tiny_spec, ratio=ratio)
    visible = tiny_spec.num_patches - num_masked(tiny_spec.num_patches, ratio)
    with torch.no_grad():
        latent = model.encode(model.normalize(imgs), mask)
    assert latent.shape == (B, 1 + visible, model.encoder.embed_dim)


def test_mae_refuses_ragged_masks(tiny_spec):
    model = _model(tiny_spec)
    imgs, mask = _batch(tiny_spec)
    mask[0, (~mask[0]).nonzero()[0]] = True  # one sample loses a visible patch
    with pytest.raises(ValueError, match="same number of visible patches"):
        model(imgs, mask)


@pytest.mark.parametrize("recipe", ["mae", "simmim"])
def test_encoder_ignores_masked_pixels(tiny_spec, recipe):
    spec = replace(tiny_spec, recipe=recipe, mask_patch_size=8 if recipe == "simmim" else None)
    model = _model(spec)
    imgs, mask = _batch(spec)
    # Scramble every masked patch's pixels.
    p, h = spec.patch_size, spec.grid_size
    pix = mask.view(B, h, h).repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)
    other = torch.where(pix, torch.rand_like(imgs), imgs)
    assert not torch.equal(other, imgs)
    with torch.no_grad():
        a = model.encode(model.normalize(imgs), mask)
        b = model.encode(model.normalize(other), mask)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_simmim_l1_loss_matches_simmim_formula(simmim_spec):
    model = _model(simmim_spec)
    imgs, mask = _batch(simmim_spec)
    with torch.no_grad():
        loss, pred = model(imgs, mask)
    # microsoft/SimMIM: pixel-level mask [B, 1, H, W]; L1 summed over masked pixels and
    # channels, / (masked pixels + 1e-5) / in_chans.
    p, h, c = simmim_spec.patch_size, simmim_spec.grid_size, simmim_spec.in_chans
    x = model.normalize(imgs)
    x_rec = model.unpatchify(pred)
    pix = mask.view(B, h, h).repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).float()
    l1 = F.l1_loss(x, x_rec, reduction="none")
    batch_loss = (l1 * pix).sum() / (pix.sum() + 1e-5) / c
    torch.testing.assert_close(loss.mean(), batch_loss, rtol=1e-5, atol=1e-5)
    per_sample = (l1 * pix).sum((1, 2, 3)) / (pix.sum((1, 2, 3)) + 1e-5) / c
    torch.testing.assert_close(loss, per_sample, rtol=1e-5, atol=1e-5)


def test_simmim_block_masks_are_constant_on_blocks(simmim_spec):
    block, grid = simmim_spec.mask_block, simmim_spec.grid_size
    assert block == 2
    masks = deterministic_masks(0, [f"s{i}" for i in range(6)], 0.6, [0, 1], grid, block)
    coarse = grid // block
    blocks = masks.view(6, 2, coarse, block, coarse, block)
    assert (blocks == blocks[:, :, :, :1, :, :1]).all()
    assert (masks.sum(-1) == block**2 * num_masked(coarse**2, 0.6)).all()
    train = random_masks(6, grid * grid, 0.6, torch.Generator().manual_seed(0), block)
    tb = train.view(6, coarse, block, coarse, block)
    assert (tb == tb[:, :, :1, :, :1]).all()


@pytest.mark.parametrize(("cells", "ratio"), [(16, 0.75), (49, 0.75), (49, 0.6), (196, 0.9)])
def test_deterministic_masks(cells, ratio):
    grid = int(cells**0.5)
    ids = ["a", "b", "c"]
    m1 = deterministic_masks(7, ids, ratio, [0, 1, 2], grid)
    m2 = deterministic_masks(7, ids, ratio, [0, 1, 2], grid)
    assert m1.dtype == torch.bool and m1.shape == (3, 3, cells)
    assert torch.equal(m1, m2)
    # Batch composition does not matter: one id alone gets the same masks.
    assert torch.equal(deterministic_masks(7, ["b"], ratio, [0, 1, 2], grid)[0], m1[1])
    assert (m1.sum(-1) == cells - int(cells * (1 - ratio))).all()
    assert not torch.equal(m1[0], m1[1])  # across sample ids
    assert not torch.equal(m1[:, 0], m1[:, 1])  # across mask indices
    assert not torch.equal(m1, deterministic_masks(8, ids, ratio, [0, 1, 2], grid))  # seeds


@pytest.mark.parametrize("recipe", ["mae", "simmim"])
def test_save_load_round_trip(tiny_spec, tmp_path, recipe):
    spec = replace(tiny_spec, recipe=recipe, mask_patch_size=8 if recipe == "simmim" else None)
    model = _model(spec)
    path = tmp_path / "model.safetensors"
    save_model(model, path, info={"seed": 0})
    loaded = load_model(path)
    assert loaded.spec == spec
    imgs, mask = _batch(spec)
    with torch.no_grad():
        a, pa = model(imgs, mask)
        b, pb = loaded(imgs, mask)
    assert torch.equal(a, b) and torch.equal(pa, pb)


def test_spec_rejects_bad_patch_sizes():
    with pytest.raises(ValueError, match="patch_size 5 does not divide img_size 16"):
        ModelSpec(img_size=16, patch_size=5)
    with pytest.raises(ValueError, match="mask_patch_size 6 must be a multiple of patch_size 4"):
        ModelSpec(recipe="simmim", img_size=16, patch_size=4, mask_patch_size=6)
    with pytest.raises(ValueError, match="recipe must be one of"):
        ModelSpec(recipe="beit")
    spec = ModelSpec(img_size=16, patch_size=4)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown model spec keys"):
        ModelSpec.from_dict({**spec.to_dict(), "depth": 3})


def test_sidecars_from_before_norm_eps_load_with_timms_default(tiny_spec, tmp_path):
    model = _model(tiny_spec)
    path = tmp_path / "model.safetensors"
    save_model(model, path)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    del sidecar["spec"]["norm_eps"]
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    loaded = load_model(path)
    assert loaded.spec.norm_eps == 1e-6 and loaded.spec == tiny_spec
    imgs, mask = _batch(tiny_spec)
    with torch.no_grad():
        assert torch.equal(model(imgs, mask)[0], loaded(imgs, mask)[0])
    with pytest.raises(ValueError, match="norm_eps must be positive"):
        replace(tiny_spec, norm_eps=0.0)


@pytest.mark.parametrize("name", sorted(TIMM_VITS))
def test_timm_vit_sizes_are_timms(name):
    """spec.architecture's table of timm sizes, against timm's own models (meta: no memory)."""
    with torch.device("meta"):
        vit = timm.create_model(name, pretrained=False, num_classes=0)
    expected = architecture(ModelSpec(encoder=name))
    assert vit.embed_dim == expected["embed_dim"]
    assert len(vit.blocks) == expected["depth"]
    assert vit.blocks[0].attn.num_heads == expected["num_heads"]
    assert vit.blocks[0].mlp.fc1.out_features == expected["mlp_ratio"] * vit.embed_dim
    assert (vit.blocks[0].attn.qkv.bias is not None) == expected["qkv_bias"]


def test_spec_differences_compare_functions_not_spellings(tiny_spec):
    base = ModelSpec(encoder="vit_base_patch16_224")
    spelled = ModelSpec(
        encoder="vit_tiny_patch16_224",
        encoder_overrides={"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4},
    )
    assert spec_differences(base, spelled) == []
    assert spec_differences(base, replace(base, encoder="vit_base_patch16_224.mae")) == []
    deeper = replace(
        tiny_spec, img_size=32, encoder_overrides={"embed_dim": 32, "depth": 3, "num_heads": 4}
    )
    assert spec_differences(tiny_spec, deeper) == [
        "dataset.img_size: checkpoint 16, config 32",
        "model.encoder_overrides.depth: checkpoint 2, config 3",
        "model.encoder_overrides.num_heads: checkpoint 2, config 4",
    ]
    assert spec_differences(tiny_spec, deeper, ignore=("img_size", "depth", "num_heads")) == []
    # SimMIM has no decoder fields to differ in.
    simmim = replace(tiny_spec, recipe="simmim")
    assert spec_differences(simmim, replace(simmim, decoder_depth=5)) == []
    assert spec_differences(tiny_spec, simmim, labels=("a", "b")) == [
        "model.decoder_depth: a 1, b (not set)",
        "model.decoder_embed_dim: a 32, b (not set)",
        "model.decoder_num_heads: a 2, b (not set)",
        "model.norm_pix_loss: a False, b (not set)",
        "model.recipe: a 'mae', b 'simmim'",
    ]
