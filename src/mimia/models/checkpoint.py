"""Checkpoint I/O: safetensors weights plus a JSON sidecar with the architecture.

``model.safetensors`` holds tensors only (no code runs on load); ``model.json`` beside it holds
the :class:`ModelSpec` and free-form provenance (training config, seed, ...).

Released weights from elsewhere are imported offline, from a local path, by
:func:`import_checkpoint` (or the per-format functions it dispatches to):

``mimia``
    this module's own safetensors + sidecar pair (:func:`load_model`).
``timm``
    a timm ``VisionTransformer`` state dict, e.g. ``vit_base_patch16_224.mae``: encoder only.
``mae``
    facebookresearch/mae ``.pth`` (``{"model": state_dict}``), with or without its decoder.
``hf``
    a HuggingFace ``ViTMAEForPreTraining.save_pretrained`` folder (config.json + weights),
    read without importing ``transformers``.

Every importer returns ``(model, info)``; ``info`` is JSON-serialisable (so it can be handed to
:func:`save_model`) and says at least ``format``, ``source``, ``sha256`` of the weights file and
``decoder_released``: when the checkpoint carries no decoder (encoder-only releases), the
model's decoder is freshly initialised from ``decoder_init_seed`` and must not be read as the
released model's decoder.

Pickled files (``.pth``, ``.bin``, ``.pt``, ``.ckpt``) are read only through
``torch.load(..., weights_only=True)``; a file that needs arbitrary unpickling is refused
(:class:`CheckpointRefusedError`) with instructions to convert it to safetensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mimia.models import build_model
from mimia.models.base import MIMModel
from mimia.models.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec

FORMATS = ("mimia", "timm", "mae", "hf")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")

# Standard ViT widths -> (timm model, heads). Heads cannot be read off the weights.
VIT_BY_WIDTH: dict[int, tuple[str, int]] = {
    192: ("vit_tiny_patch16_224", 3),
    384: ("vit_small_patch16_224", 6),
    768: ("vit_base_patch16_224", 12),
    1024: ("vit_large_patch16_224", 16),
    1280: ("vit_huge_patch14_224", 16),
}
# MAE's decoders: 512-d x 8 blocks with 16 heads for every released model.
DECODER_HEADS_BY_WIDTH: dict[int, int] = {512: 16}
# timm's VisionTransformer and mimia's MAE decoder blocks use LayerNorm(eps=1e-6).
LAYER_NORM_EPS = 1e-6
# Keys of a timm / official checkpoint that belong to a classifier, not the MIM encoder.
_HEAD_PREFIXES = ("head.", "fc_norm.")


class CheckpointRefusedError(ValueError):
    """A pickled checkpoint that cannot be read without running arbitrary code."""


# -- mimia's own format ------------------------------------------------------------------------
def sidecar_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_model(model: MIMModel, weights: str | Path, info: dict[str, Any] | None = None) -> None:
    """Write weights and sidecar atomically (temp files, then rename)."""
    weights = Path(weights)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp_w = weights.with_name(weights.name + ".tmp")
    tmp_j = sidecar_path(weights).with_name(sidecar_path(weights).name + ".tmp")
    save_file(state, str(tmp_w))
    tmp_j.write_text(json.dumps({"spec": model.spec.to_dict(), "info": info or {}}, indent=2))
    os.replace(tmp_j, sidecar_path(weights))
    os.replace(tmp_w, weights)


def read_sidecar(weights: str | Path) -> dict[str, Any]:
    path = sidecar_path(weights)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint sidecar {path} is missing (expected beside {weights})")
    return json.loads(path.read_text())


def load_model(weights: str | Path, device: str = "cpu") -> MIMModel:
    spec = ModelSpec.from_dict(read_sidecar(weights)["spec"])
    model = build_model(spec)
    model.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    return model.to(device).eval()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- reading foreign weight files ---------------------------------------------------------------
def read_weights(path: str | Path) -> Any:
    """The object stored in a safetensors or (tensor-only) pickled weights file.

    Pickles go through ``torch.load(weights_only=True)`` only; anything that needs arbitrary
    unpickling raises :class:`CheckpointRefusedError`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    if suffix not in PICKLE_SUFFIXES:
        raise ValueError(
            f"cannot read weights from {path}: expected .safetensors or a tensor-only pickle "
            f"({', '.join(PICKLE_SUFFIXES)})"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler" in ln]
        reason = lines[0].split(" Please use")[0] if lines else type(e).__name__
        raise CheckpointRefusedError(
            f"checkpoint {path} is refused: it holds pickled objects other than tensors, which "
            f"only arbitrary unpickling (running code from the file) could load "
            f"[torch: {reason}]. If you trust its source, convert it once, in a sandbox, to "
            f"safetensors and import that file instead, e.g.\n"
            f'  python -c "import torch; from safetensors.torch import save_file; '
            f"o = torch.load('{path}', map_location='cpu', weights_only=False); "
            f"sd = o.get('model', o.get('state_dict', o)); "
            f"save_file({{k: v.clone().contiguous() for k, v in sd.items()}}, "
            f"'{path.with_suffix('.safetensors')}')\""
        ) from e


def _state_dict(obj: Any, path: Path, wrappers: Iterable[str] = ("model", "state_dict")) -> dict:
    """The ``{name: tensor}`` mapping in ``obj``, unwrapping ``{"model": ...}`` and the like."""
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in wrappers:
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                bad = sorted(k for k, v in inner.items() if not isinstance(v, torch.Tensor))
                if bad:
                    raise ValueError(f"{path}: {key!r} holds non-tensor entries {bad[:10]}")
                return dict(inner)
        raise ValueError(
            f"{path} holds no state dict: expected tensors or one of the keys "
            f"{list(wrappers)}, got keys {sorted(map(str, obj))[:20]}"
        )
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")


def _fmt_keys(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _load_part(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(sd, strict=True)`` with errors that name keys and shapes."""
    expected = module.state_dict()
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_fmt_keys(unexpected)}")
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes[:12]))
    if problems:
        raise ValueError(f"{what} does not fit the model: " + " | ".join(problems))
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True)


def _build(spec: ModelSpec, seed: int) -> MIMModel:
    """A freshly initialised model; parts the checkpoint lacks keep this seeded init."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(spec)


def _block_count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    ids = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    if ids and ids != set(range(max(ids) + 1)):
        raise ValueError(f"blocks {prefix}N are not numbered 0..{max(ids)}: {sorted(ids)}")
    return len(ids)


def _require(sd: Mapping[str, torch.Tensor], keys: Iterable[str], what: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ValueError(f"{what}: cannot infer the architecture, missing keys {missing}")


def infer_spec(
    sd: Mapping[str, torch.Tensor],
    *,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    norm_pix_loss: bool = False,
) -> tuple[ModelSpec, list[str]]:
    """A MAE :class:`ModelSpec` from official/timm key names and tensor shapes.

    Encoder keys are unprefixed (``patch_embed.proj.weight``, ``blocks.N...``); decoder keys,
    if any, as in facebookresearch/mae (``decoder_embed.weight``, ``decoder_blocks.N...``).
    Head counts come from the standard ViT sizes unless given; ``norm_pix_loss`` is not in the
    weights either. Returns the spec and the names of the fields that were assumed.
    """
    _require(sd, ["patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"], "encoder")
    embed_dim, in_chans, patch, patch_w = sd["patch_embed.proj.weight"].shape
    if patch != patch_w:
        raise ValueError(f"non-square patches {patch}x{patch_w} are not supported")
    n_pos = sd["pos_embed"].shape[1] - 1  # minus the cls position
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise ValueError(f"pos_embed has {n_pos} patch positions, not a square grid (+ cls)")
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    mlp_ratio = hidden / embed_dim
    if int(embed_dim * mlp_ratio) != hidden:
        raise ValueError(f"MLP width {hidden} is not representable as embed_dim * mlp_ratio")
    assumed = []
    encoder_name, default_heads = VIT_BY_WIDTH.get(embed_dim, ("vit_base_patch16_224", None))
    if num_heads is None:
        if default_heads is None:
            raise ValueError(
                f"cannot infer num_heads for a non-standard width embed_dim={embed_dim} "
                f"(standard: {sorted(VIT_BY_WIDTH)}); pass num_heads=... or a full spec"
            )
        num_heads = default_heads
        assumed.append("num_heads")
    overrides: dict[str, Any] = {
        "embed_dim": embed_dim,
        "depth": _block_count(sd, "blocks."),
        "num_heads": num_heads,
        "mlp_ratio": mlp_ratio,
    }
    if "blocks.0.attn.qkv.bias" not in sd:
        overrides["qkv_bias"] = False
    fields: dict[str, Any] = {}
    if "decoder_embed.weight" in sd:
        _require(sd, ["decoder_blocks.0.mlp.fc1.weight"], "decoder")
        dec_dim = sd["decoder_embed.weight"].shape[0]
        if sd["decoder_blocks.0.mlp.fc1.weight"].shape[0] != 4 * dec_dim:
            raise ValueError("mimia's MAE decoder has mlp_ratio 4; this checkpoint's differs")
        if decoder_num_heads is None:
            if dec_dim not in DECODER_HEADS_BY_WIDTH:
                raise ValueError(
                    f"cannot infer decoder_num_heads for decoder width {dec_dim} "
                    f"(known: {sorted(DECODER_HEADS_BY_WIDTH)}); pass decoder_num_heads=..."
                )
            decoder_num_heads = DECODER_HEADS_BY_WIDTH[dec_dim]
            assumed.append("decoder_num_heads")
        fields = {
            "decoder_embed_dim": dec_dim,
            "decoder_depth": _block_count(sd, "decoder_blocks."),
            "decoder_num_heads": decoder_num_heads,
        }
    assumed.append("norm_pix_loss")
    spec = ModelSpec(
        recipe="mae",
        encoder=encoder_name,
        encoder_overrides=overrides,
        img_size=grid * patch,
        patch_size=patch,
        in_chans=in_chans,
        norm_pix_loss=norm_pix_loss,
        **fields,
    )
    return spec, assumed


def _split_head(sd: Mapping[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """Drop classifier keys (``head.*``, ``fc_norm.*``), returning what was dropped."""
    kept = {k: v for k, v in sd.items() if not k.startswith(_HEAD_PREFIXES)}
    return kept, sorted(set(sd) - set(kept))


def _hint_finetuned(sd: Mapping[str, torch.Tensor], ignored: list[str]) -> str:
    if "norm.weight" not in sd and any(k.startswith("fc_norm.") for k in ignored):
        return (
            " (this looks like a fine-tuned classifier with global pooling: its final norm is "
            "fc_norm, not the pre-training encoder's norm; import the pre-trained checkpoint)"
        )
    return ""


def _base_info(fmt: str, path: Path, weights: Path, seed: int) -> dict[str, Any]:
    return {
        "format": fmt,
        "source": str(path),
        "weights_file": str(weights),
        "sha256": file_sha256(weights),
        "decoder_init_seed": seed,
    }


# -- timm ---------------------------------------------------------------------------------------
def import_timm_encoder(
    path: str | Path,
    spec: ModelSpec | None = None,
    *,
    num_heads: int | None = None,
    seed: int = 0,
) -> tuple[MIMModel, dict[str, Any]]:
    """A model whose encoder holds a timm ViT state dict; its decoder is not released.

    ``head.*``/``fc_norm.*`` keys are ignored (listed in ``info["ignored_keys"]``); any other
    key the encoder lacks, or lacks from the file, or a shape mismatch, is a ValueError. Without
    ``spec`` a MAE spec is inferred from the shapes (heads from the standard ViT sizes).
    """
    path = Path(path)
    sd, ignored = _split_head(_state_dict(read_weights(path), path))
    assumed: list[str] = []
    if spec is None:
        spec, assumed = infer_spec(sd, num_heads=num_heads)
    model = _build(spec, seed)
    _load_part(model.encoder, sd, f"timm encoder {path}" + _hint_finetuned(sd, ignored))
    info = _base_info("timm", path, path, seed) | {
        "decoder_released": False,
        "ignored_keys": ignored,
        "assumed": assumed,
    }
    return model.eval(), info


# -- facebookresearch/mae ---------------------------------------------------------------------
_MAE_DECODER_PREFIXES = ("decoder_", "mask_token")


def import_mae_checkpoint(
    path: str | Path,
    spec: ModelSpec | None = None,
    *,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    norm_pix_loss: bool = False,
    seed: int = 0,
) -> tuple[MIMModel, dict[str, Any]]:
    """An official facebookresearch/mae checkpoint (``{"model": state_dict}`` or a bare one).

    Encoder keys (``cls_token``, ``pos_embed``, ``patch_embed.*``, ``blocks.*``, ``norm.*``)
    go to ``model.encoder``; ``mask_token`` and ``decoder_*`` to ``model.decoder``. Without
    decoder keys (the encoder-only ``mae_pretrain_vit_*.pth`` releases) the decoder stays
    freshly initialised and ``info["decoder_released"]`` is False. Without ``spec`` it is
    inferred from the shapes; heads default to the standard sizes and ``norm_pix_loss`` (not
    recorded in the weights) to the argument, all listed in ``info["assumed"]``.
    """
    path = Path(path)
    sd, ignored = _split_head(_state_dict(read_weights(path), path))
    assumed: list[str] = []
    if spec is None:
        spec, assumed = infer_spec(
            sd,
            num_heads=num_heads,
            decoder_num_heads=decoder_num_heads,
            norm_pix_loss=norm_pix_loss,
        )
    if spec.recipe != "mae":
        raise ValueError(f"an official MAE checkpoint needs recipe 'mae', got {spec.recipe!r}")
    enc = {k: v for k, v in sd.items() if not k.startswith(_MAE_DECODER_PREFIXES)}
    dec = {k: v for k, v in sd.items() if k.startswith(_MAE_DECODER_PREFIXES)}
    model = _build(spec, seed)
    _load_part(model.encoder, enc, f"MAE encoder {path}" + _hint_finetuned(sd, ignored))
    if dec:
        _load_part(model.decoder, dec, f"MAE decoder {path}")
    info = _base_info("mae", path, path, seed) | {
        "decoder_released": bool(dec),
        "ignored_keys": ignored,
        "assumed": assumed,
    }
    return model.eval(), info


# -- HuggingFace ViTMAE -----------------------------------------------------------------------
# Module paths inside one HF ViTMAELayer, in the legacy layout that save_pretrained writes and
# the hub holds, and in transformers v5's in-memory layout.
_HF_LAYER_PARTS = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc2": "mlp.fc2",
}
_HF_FIXED = {
    "vit.embeddings.cls_token": "encoder.cls_token",
    "vit.embeddings.position_embeddings": "encoder.pos_embed",
    "vit.embeddings.patch_embeddings.projection.weight": "encoder.patch_embed.proj.weight",
    "vit.embeddings.patch_embeddings.projection.bias": "encoder.patch_embed.proj.bias",
    "vit.layernorm.weight": "encoder.norm.weight",
    "vit.layernorm.bias": "encoder.norm.bias",
    "decoder.mask_token": "decoder.mask_token",
    "decoder.decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder.decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder.decoder_embed.bias": "decoder.decoder_embed.bias",
    "decoder.decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder.decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder.decoder_pred.bias": "decoder.decoder_pred.bias",
}
# Encoder layers: vit.encoder.layer.N (legacy) or vit.layers.N (v5). Decoder layers:
# decoder.decoder_layers.N (hub), or decoder.decoder_encoder.layer.N, which transformers 5's
# save_pretrained writes by reverse-applying ViTModel's "encoder.layer." -> "layers." renaming.
_HF_LAYER = re.compile(
    r"^(?:vit\.(?:encoder\.layer|layers)|decoder\.(?:decoder_layers|decoder_encoder\.layer))"
    r"\.(\d+)\.(.+)\.(weight|bias)$"
)


def _hf_to_mimia(sd: Mapping[str, torch.Tensor], qkv_bias: bool) -> dict[str, torch.Tensor]:
    """HF ViTMAE names -> mimia names, fusing query/key/value into timm's ``qkv``."""
    if not any(k.startswith(("vit.", "decoder.")) for k in sd):  # a bare ViTMAEModel
        sd = {f"vit.{k}": v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        if key in _HF_FIXED:
            out[_HF_FIXED[key]] = value
            continue
        m = _HF_LAYER.match(key)
        part = _HF_LAYER_PARTS.get(m.group(2)) if m else None
        if m is None or part is None:
            unknown.append(key)
            continue
        block = (
            f"encoder.blocks.{m.group(1)}"
            if key.startswith("vit.")
            else f"decoder.decoder_blocks.{m.group(1)}"
        )
        if part in ("q", "k", "v"):
            qkv.setdefault((f"{block}.attn.qkv", m.group(3)), {})[part] = value
        else:
            out[f"{block}.{part}.{m.group(3)}"] = value
    if unknown:
        raise ValueError(f"unrecognised HuggingFace ViTMAE keys: {_fmt_keys(unknown)}")
    for (name, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{name}.{kind}: query/key/value incomplete, found {sorted(parts)}")
        out[f"{name}.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if not qkv_bias:  # timm blocks carry a qkv bias: zeros compute the same function
        for (name, kind), parts in list(qkv.items()):
            if kind == "weight" and f"{name}.bias" not in out:
                out[f"{name}.bias"] = parts["q"].new_zeros(3 * parts["q"].shape[0])
    return out


def _square(value: Any, name: str) -> int:
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise ValueError(f"non-square {name} {value} is not supported")
        value = value[0]
    return int(value)


def hf_spec(config: Mapping[str, Any], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> ModelSpec:
    """A MAE :class:`ModelSpec` from a ``ViTMAEConfig`` dict (config.json).

    ``layer_norm_eps``: timm's ViT and mimia's decoder use 1e-6, as the official MAE that
    trained the released weights. A smaller eps (transformers' default 1e-12, which the
    converted ``facebook/vit-mae-*`` configs carry) imports with a warning: the functions
    differ only where a token's variance is below ~1e-6. A larger eps changes the function and
    is refused.
    """
    if config.get("model_type", "vit_mae") != "vit_mae":
        raise ValueError(f"config model_type is {config['model_type']!r}, expected 'vit_mae'")
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"hidden_act {act!r} is not supported: timm blocks use exact GELU")
    eps = float(config.get("layer_norm_eps", 1e-12))
    if eps > LAYER_NORM_EPS * (1 + 1e-9):
        raise ValueError(
            f"layer_norm_eps {eps:g} cannot be represented: mimia's timm blocks use "
            f"{LAYER_NORM_EPS:g}"
        )
    if eps < LAYER_NORM_EPS * (1 - 1e-9):
        warnings.warn(
            f"HF config layer_norm_eps is {eps:g}; mimia uses {LAYER_NORM_EPS:g} (as the "
            f"official MAE and timm), so outputs can differ from HuggingFace's in the last "
            f"digits (only tokens with variance near {LAYER_NORM_EPS:g} are affected)",
            UserWarning,
            stacklevel=3,
        )
    hidden = int(config.get("hidden_size", 768))
    intermediate = int(config.get("intermediate_size", 3072))
    mlp_ratio = intermediate / hidden
    if int(hidden * mlp_ratio) != intermediate:
        raise ValueError(f"intermediate_size {intermediate} is not hidden_size * a ratio")
    dec_hidden = int(config.get("decoder_hidden_size", 512))
    dec_inter = int(config.get("decoder_intermediate_size", 2048))
    if dec_inter != 4 * dec_hidden:
        raise ValueError(
            f"decoder_intermediate_size {dec_inter} != 4 * decoder_hidden_size {dec_hidden}: "
            "mimia's MAE decoder has mlp_ratio 4"
        )
    encoder_name = VIT_BY_WIDTH.get(hidden, ("vit_base_patch16_224", 0))[0]
    return ModelSpec(
        recipe="mae",
        encoder=encoder_name,
        encoder_overrides={
            "embed_dim": hidden,
            "depth": int(config.get("num_hidden_layers", 12)),
            "num_heads": int(config.get("num_attention_heads", 12)),
            "mlp_ratio": mlp_ratio,
        },
        img_size=_square(config.get("image_size", 224), "image_size"),
        patch_size=_square(config.get("patch_size", 16), "patch_size"),
        in_chans=int(config.get("num_channels", 3)),
        decoder_embed_dim=dec_hidden,
        decoder_depth=int(config.get("decoder_num_hidden_layers", 8)),
        decoder_num_heads=int(config.get("decoder_num_attention_heads", 16)),
        norm_pix_loss=bool(config.get("norm_pix_loss", False)),
        mean=tuple(mean),
        std=tuple(std),
    )


def _hf_weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.index.json")):
        raise ValueError(f"{folder}: sharded HF checkpoints are not supported; merge the shards")
    raise FileNotFoundError(f"{folder} holds neither model.safetensors nor pytorch_model.bin")


def import_hf_vitmae(
    folder: str | Path,
    *,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    seed: int = 0,
) -> tuple[MIMModel, dict[str, Any]]:
    """A ``ViTMAEForPreTraining.save_pretrained`` folder, without importing transformers.

    The spec comes from config.json (see :func:`hf_spec` for ``layer_norm_eps``); weights from
    model.safetensors or pytorch_model.bin (tensor-only). A bare ``ViTMAEModel`` (no decoder)
    imports with ``decoder_released`` False; position embeddings absent from the file get the
    fixed sin-cos ones (``info["sincos_filled"]``). mimia models normalise internally: HF's
    ``pixel_values`` correspond to mimia images ``pixel_values * std + mean``.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not folder.exists():
        raise FileNotFoundError(f"HF checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"HF checkpoint {folder} must be a save_pretrained folder")
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: not a save_pretrained folder")
    config = json.loads(config_path.read_text())
    spec = hf_spec(config, mean=mean, std=std)
    weights = _hf_weights_file(folder)
    sd = _hf_to_mimia(_state_dict(read_weights(weights), weights), config.get("qkv_bias", True))
    enc = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
    dec = {k.removeprefix("decoder."): v for k, v in sd.items() if k.startswith("decoder.")}
    model = _build(spec, seed)
    # Fixed sin-cos position embeddings that a file leaves out are mimia's own, which equal
    # HF's (the same [w | h] layout as the original MAE).
    fixed = []
    if "pos_embed" not in enc:
        enc["pos_embed"] = model.encoder.pos_embed.detach().clone()
        fixed.append("encoder.pos_embed")
    if dec and "decoder_pos_embed" not in dec:
        dec["decoder_pos_embed"] = model.decoder.decoder_pos_embed.detach().clone()
        fixed.append("decoder.decoder_pos_embed")
    _load_part(model.encoder, enc, f"HF ViTMAE encoder {weights}")
    if dec:
        _load_part(model.decoder, dec, f"HF ViTMAE decoder {weights}")
    info = _base_info("hf", folder, weights, seed) | {
        "decoder_released": bool(dec),
        "config_sha256": file_sha256(config_path),
        "hf_layer_norm_eps": float(config.get("layer_norm_eps", 1e-12)),
        "hf_mask_ratio": config.get("mask_ratio"),
        "ignored_keys": [],
        "assumed": ["mean", "std"],
        "sincos_filled": fixed,
    }
    return model.eval(), info


# -- one entry point ----------------------------------------------------------------------------
def import_checkpoint(
    path: str | Path, format: str, spec: ModelSpec | None = None, **kwargs: Any
) -> tuple[MIMModel, dict[str, Any]]:
    """Build a mimia model from released weights at a local ``path``: ``(model, info)``.

    ``format`` is one of :data:`FORMATS`. ``spec`` fixes the architecture for ``timm`` and
    ``mae`` (else inferred from shapes); for ``mimia`` and ``hf`` the architecture is in the
    checkpoint, and a given ``spec`` must agree with it (for ``hf`` its mean/std are used).
    Extra keyword arguments go to the format's importer (``num_heads=``, ``seed=``, ...).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; expected one of {FORMATS}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if format == "timm":
        return import_timm_encoder(path, spec, **kwargs)
    if format == "mae":
        return import_mae_checkpoint(path, spec, **kwargs)
    if format == "hf":
        if spec is not None:
            kwargs = {"mean": spec.mean, "std": spec.std, **kwargs}
        model, info = import_hf_vitmae(path, **kwargs)
    else:
        if kwargs:
            raise TypeError(f"format 'mimia' takes no options, got {sorted(kwargs)}")
        sidecar = read_sidecar(path)
        model = load_model(path)
        info = {
            "format": "mimia",
            "source": str(path),
            "weights_file": str(path),
            "sha256": file_sha256(path),
            "decoder_released": bool(sidecar.get("info", {}).get("decoder_released", True)),
            "sidecar_info": sidecar.get("info", {}),
        }
    if spec is not None:
        _check_same_architecture(
            model.spec, spec, exclude=("mean", "std") if format == "hf" else ()
        )
    return model, info


def _check_same_architecture(found: ModelSpec, given: ModelSpec, exclude: Iterable[str]) -> None:
    diff = [
        f"{f.name}: checkpoint {getattr(found, f.name)!r} vs given {getattr(given, f.name)!r}"
        for f in dataclasses.fields(ModelSpec)
        if f.name not in exclude and getattr(found, f.name) != getattr(given, f.name)
    ]
    if diff:
        raise ValueError("the given spec disagrees with the checkpoint: " + "; ".join(diff))
