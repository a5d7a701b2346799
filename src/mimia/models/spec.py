"""The architecture of a MIM model, as recorded in every checkpoint's JSON sidecar."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RECIPES = ("mae", "simmim")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model before loading its weights.

    ``encoder`` names a timm VisionTransformer (``vit_tiny_patch16_224``, ...);
    ``encoder_overrides`` changes its width/depth/heads, e.g. for the tiny models that fit
    digits on a laptop CPU. Images enter the model in [0, 1]; ``mean``/``std`` normalise them
    inside the model so a checkpoint is self-contained.
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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model spec keys {sorted(unknown)}; expected {sorted(known)}")
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)


def spec_differences(a: ModelSpec, b: ModelSpec, ignore=()) -> list[str]:
    """``field: a vs b`` for every field in which two specs differ."""
    return [
        f"{f.name}: {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}"
        for f in dataclasses.fields(ModelSpec)
        if f.name not in ignore and getattr(a, f.name) != getattr(b, f.name)
    ]


def declared_spec(path, format: str) -> ModelSpec | None:
    """The architecture a checkpoint declares without reading its weights (None: timm/mae)."""
    import json
    from pathlib import Path

    if format != "mimia":
        return None
    sidecar = Path(path).with_suffix(".json")
    if not sidecar.is_file():
        raise FileNotFoundError(f"checkpoint sidecar {sidecar} is missing (beside {path})")
    return ModelSpec.from_dict(json.loads(sidecar.read_text())["spec"])
