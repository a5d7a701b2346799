"""The architecture of a MIM model, as recorded in every checkpoint's JSON sidecar.

Nothing here imports torch: a checkpoint's declared architecture (:func:`declared_spec`) can
be checked against an experiment's config (:func:`spec_differences`) before any job runs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RECIPES = ("mae", "simmim")

# timm's own sizes for the ViT names mimia builds on (timm/models/vision_transformer.py,
# ``model_args``); with the VisionTransformer defaults below they fix the encoder.
TIMM_VITS: dict[str, dict[str, Any]] = {
    "vit_tiny_patch16_224": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "vit_small_patch16_224": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base_patch16_224": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "vit_large_patch16_224": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "vit_huge_patch14_224": {"embed_dim": 1280, "depth": 32, "num_heads": 16},
}
TIMM_VIT_DEFAULTS: dict[str, Any] = {"mlp_ratio": 4.0, "qkv_bias": True}
# Standard widths -> the timm name a checkpoint of that width is built from.
VIT_BY_WIDTH: dict[int, str] = {v["embed_dim"]: k for k, v in TIMM_VITS.items()}

_ENCODER_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")
_MAE_ONLY = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads", "norm_pix_loss")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model before loading its weights.

    ``encoder`` names a timm VisionTransformer (``vit_tiny_patch16_224``, ...);
    ``encoder_overrides`` changes its width/depth/heads, e.g. for the tiny models that fit
    digits on a laptop CPU. Images enter the model in [0, 1]; ``mean``/``std`` normalise them
    inside the model so a checkpoint is self-contained. ``norm_eps`` is every LayerNorm's
    epsilon (encoder and MAE decoder): 1e-6 in timm's ViT and the official MAE.
    """

    recipe: str = "mae"
    encoder: str = "vit_tiny_patch16_224"
    encoder_overrides: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    norm_pix_loss: bool = False
    mask_patch_size: int | None = None  # SimMIM's mask block, in pixels
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.patch_size < 1 or self.img_size < 1:
            raise ValueError(
                f"img_size and patch_size must be positive, got {self.img_size}, {self.patch_size}"
            )
        if self.img_size % self.patch_size:
            raise ValueError(
                f"patch_size {self.patch_size} does not divide img_size {self.img_size}"
            )
        if self.mask_patch_size is not None and (
            self.mask_patch_size % self.patch_size or self.img_size % self.mask_patch_size
        ):
            raise ValueError(
                f"mask_patch_size {self.mask_patch_size} must be a multiple of patch_size "
                f"{self.patch_size} and divide img_size {self.img_size}"
            )
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"mean/std need {self.in_chans} values, got {self.mean}, {self.std}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        arch = architecture(self)
        pairs = (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads"))
        for width, heads in pairs:
            w, n = arch.get(width), arch.get(heads)
            if isinstance(w, int) and isinstance(n, int) and (n < 1 or w % n):
                raise ValueError(
                    f"{config_key(heads)}={n} does not divide {config_key(width)}={w}: "
                    f"attention splits the width evenly across its heads"
                )

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def mask_block(self) -> int:
        """Side of a mask block in model patches (1 = per-patch masks, as MAE)."""
        return (self.mask_patch_size or self.patch_size) // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """A spec from :meth:`to_dict`; sidecars older than ``norm_eps`` get its 1e-6."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model spec keys {sorted(unknown)}; expected {sorted(known)}")
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)


# -- comparing architectures -------------------------------------------------------------------
def config_key(name: str) -> str:
    """Where a field of :func:`architecture` is set in an experiment's config."""
    if name == "img_size":
        return "dataset.img_size"
    if name in (f.name for f in dataclasses.fields(ModelSpec)):
        return f"model.{name}"
    return f"model.encoder_overrides.{name}"


def architecture(spec: ModelSpec) -> dict[str, Any]:
    """The function a spec builds, as flat fields: the same model spelled two ways is equal.

    The encoder's width/depth/heads come from timm's sizes for the known ViT names unless
    overridden (``encoder`` itself is a field only for other names); SimMIM has no decoder
    fields and no ``norm_pix_loss``.
    """
    out: dict[str, Any] = {"recipe": spec.recipe}
    name = spec.encoder.split(".")[0]  # a pretrained tag (".mae") does not change the shapes
    if name in TIMM_VITS:
        out |= TIMM_VIT_DEFAULTS | TIMM_VITS[name]
    else:
        out["encoder"] = spec.encoder
    out |= spec.encoder_overrides
    if "mlp_ratio" in out:
        out["mlp_ratio"] = float(out["mlp_ratio"])
    for f in dataclasses.fields(ModelSpec):
        if f.name not in ("recipe", "encoder", "encoder_overrides"):
            out[f.name] = getattr(spec, f.name)
    out["mean"], out["std"] = tuple(spec.mean), tuple(spec.std)
    if spec.recipe == "simmim":
        for key in _MAE_ONLY:
            out.pop(key)
    return out


def spec_differences(
    a: ModelSpec,
    b: ModelSpec,
    ignore: Iterable[str] = (),
    labels: tuple[str, str] = ("checkpoint", "config"),
) -> list[str]:
    """Human-readable differences between the functions two specs build, [] if none.

    Each names the config key to change, e.g. ``model.encoder_overrides.depth: checkpoint 1,
    config 3``. ``ignore`` skips fields by name (``mean``, ``depth``, ...).
    """
    ignore = set(ignore)
    fa, fb = architecture(a), architecture(b)
    missing = object()
    out = []
    for key in sorted(set(fa) | set(fb), key=lambda k: (config_key(k), k)):
        va, vb = fa.get(key, missing), fb.get(key, missing)
        if key in ignore or va == vb:
            continue
        shown = ["(not set)" if v is missing else repr(v) for v in (va, vb)]
        out.append(f"{config_key(key)}: {labels[0]} {shown[0]}, {labels[1]} {shown[1]}")
    return out


# -- architectures that checkpoints declare ----------------------------------------------------
def sidecar_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} is missing")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None


# transformers' ViTMAEConfig defaults: what HuggingFace itself reads for a key config.json
# leaves out (so using them is reading the config, not guessing).
HF_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "qkv_bias": True,
    "decoder_num_attention_heads": 16,
    "decoder_hidden_size": 512,
    "decoder_num_hidden_layers": 8,
    "decoder_intermediate_size": 2048,
    "norm_pix_loss": False,
}


def _square(value: Any, name: str) -> int:
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise ValueError(f"non-square {name} {value} is not supported")
        value = value[0]
    return int(value)


def hf_fields(config: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
    """ModelSpec fields from a ``ViTMAEConfig`` dict, each with where it was read."""
    if config.get("model_type", "vit_mae") != "vit_mae":
        raise ValueError(f"config model_type is {config['model_type']!r}, expected 'vit_mae'")

    def get(key: str, cast=int) -> tuple[Any, str]:
        if key in config:
            return cast(config[key]), f"config.json {key}"
        return cast(HF_DEFAULTS[key]), f"ViTMAEConfig default {key}"

    act = get("hidden_act", str)[0]
    if act != "gelu":
        raise ValueError(f"hidden_act {act!r} is not supported: timm blocks use exact GELU")
    (hidden, _), (inter, s_inter) = get("hidden_size"), get("intermediate_size")
    mlp_ratio = inter / hidden
    if int(hidden * mlp_ratio) != inter:
        raise ValueError(f"intermediate_size {inter} is not hidden_size * a ratio")
    dec_hidden, dec_inter = get("decoder_hidden_size")[0], get("decoder_intermediate_size")[0]
    if dec_inter != 4 * dec_hidden:
        raise ValueError(
            f"decoder_intermediate_size {dec_inter} != 4 * decoder_hidden_size {dec_hidden}: "
            "mimia's MAE decoder has mlp_ratio 4"
        )
    return {
        "embed_dim": get("hidden_size"),
        "depth": get("num_hidden_layers"),
        "num_heads": get("num_attention_heads"),
        "mlp_ratio": (mlp_ratio, f"{s_inter} / hidden_size"),
        "img_size": get("image_size", lambda v: _square(v, "image_size")),
        "patch_size": get("patch_size", lambda v: _square(v, "patch_size")),
        "in_chans": get("num_channels"),
        "decoder_embed_dim": get("decoder_hidden_size"),
        "decoder_depth": get("decoder_num_hidden_layers"),
        "decoder_num_heads": get("decoder_num_attention_heads"),
        "norm_pix_loss": get("norm_pix_loss", bool),
        "norm_eps": get("layer_norm_eps", float),
    }


def spec_from_fields(fields: Mapping[str, Any], **extra: Any) -> ModelSpec:
    """A MAE spec from flat :func:`architecture` fields (encoder name chosen by width)."""
    enc = {k: fields[k] for k in _ENCODER_KEYS if k in fields}
    if enc.get("qkv_bias", True):
        enc.pop("qkv_bias", None)
    rest = {k: v for k, v in fields.items() if k not in _ENCODER_KEYS}
    encoder = VIT_BY_WIDTH.get(enc["embed_dim"], "vit_base_patch16_224")
    return ModelSpec(recipe="mae", encoder=encoder, encoder_overrides=enc, **rest, **extra)


def hf_mean_std(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``image_mean``/``image_std`` from a folder's preprocessor_config.json, if it has one."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    cfg = read_json(path, "HF preprocessor config")
    if "image_mean" not in cfg or "image_std" not in cfg:
        return None
    return tuple(map(float, cfg["image_mean"])), tuple(map(float, cfg["image_std"]))


def hf_spec(config: Mapping[str, Any], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> ModelSpec:
    """A MAE :class:`ModelSpec` from a ``ViTMAEConfig`` dict (config.json).

    ``layer_norm_eps`` becomes ``norm_eps`` exactly (transformers' default 1e-12, which the
    converted ``facebook/vit-mae-*`` configs carry, included).
    """
    fields = {k: v for k, (v, _) in hf_fields(config).items()}
    return spec_from_fields(fields, mean=tuple(mean), std=tuple(std))


def declared_spec(
    path: str | Path, format: str, fallback: ModelSpec | None = None
) -> ModelSpec | None:
    """The architecture a checkpoint declares, read without loading its weights.

    ``mimia``: the sidecar ``model.json`` beside the weights; ``hf``: the folder's config.json
    (mean/std from preprocessor_config.json if there, else ``fallback``'s, else ImageNet's:
    HuggingFace normalises outside the model, so a folder without that file does not say);
    ``timm`` and ``mae``: None, their weights do not record the architecture (it comes from
    the config and is checked against the tensor shapes at import).
    """
    path = Path(path)
    if format in ("timm", "mae"):
        return None
    if format == "mimia":
        sidecar = read_json(sidecar_path(path), f"checkpoint sidecar (beside {path.name})")
        if not isinstance(sidecar, dict) or "spec" not in sidecar:
            raise ValueError(f"checkpoint sidecar {sidecar_path(path)} holds no 'spec'")
        return ModelSpec.from_dict(sidecar["spec"])
    if format == "hf":
        if not path.exists():
            raise FileNotFoundError(f"HF checkpoint folder {path} does not exist")
        if not path.is_dir():
            raise NotADirectoryError(f"HF checkpoint {path} must be a save_pretrained folder")
        config = read_json(path / "config.json", "HF config")
        mean_std = hf_mean_std(path)
        if mean_std is None:
            mean_std = (fallback.mean, fallback.std) if fallback else (IMAGENET_MEAN, IMAGENET_STD)
        return hf_spec(config, *mean_std)
    raise ValueError(f"unknown checkpoint format {format!r}; expected mimia, timm, mae or hf")
