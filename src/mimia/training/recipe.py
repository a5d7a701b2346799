"""The MIM recipe of MAE's ``main_pretrain.py``: settings, learning rate, parameter groups and
augmentation (the device and precision a run uses: :mod:`mimia.devices`).

AdamW (betas 0.9/0.95) with no weight decay on biases and norms, lr = blr * effective batch /
256, per-iteration cosine schedule after a linear warm-up, optional RandomResizedCrop + flip.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

RUNTIME_KNOBS = ("device", "compile", "precision")
"""TrainConfig fields that say how a run goes, not what it trains: not in its fingerprint."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run's settings: a ``pretrain``/``adapt`` config section (whose defaults
    live in the experiment schema, see :meth:`from_section`) plus the seed and the runtime
    knobs ``device``, ``compile`` and ``precision``, which change how it runs, not what it
    computes (beyond float rounding).

    Two settings say where it runs and are easily confused: ``devices`` is the number of
    processes (one per GPU) that train together with DDP; it is part of the recipe, since each
    process takes ``batch_size`` images of every step, so it sets the effective batch and the
    learning rate. ``device`` (``runtime.device``: auto, cpu, cuda, cuda:1) is the kind of
    device those processes use; it changes no result and reruns nothing.
    """

    epochs: int
    batch_size: int
    accum_iter: int
    blr: float
    min_lr: float
    weight_decay: float
    betas: tuple[float, float]
    warmup_epochs: int
    mask_ratio: float
    augment: bool
    crop_scale: tuple[float, float]
    checkpoint_every: int
    devices: int
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    precision: str = "auto"  # mimia.devices.PRECISIONS: bf16 autocast on CUDA by default

    @classmethod
    def from_section(
        cls,
        section: dict,
        *,
        seed: int = 0,
        device: str = "auto",
        compile: bool = False,
        precision: str = "auto",
    ) -> TrainConfig:
        """From a config section; keys it leaves out take the schema's ``pretrain`` defaults."""
        from mimia.schema import schema_defaults

        values = {**schema_defaults("pretrain"), **section}
        for key in ("betas", "crop_scale"):
            values[key] = tuple(values[key])
        return cls(seed=seed, device=device, compile=compile, precision=precision, **values)

    @property
    def lr(self) -> float:
        """MAE's rule on the effective batch: per-process batch x accumulation x processes."""
        return self.blr * self.batch_size * self.accum_iter * self.devices / 256

    def fingerprint(self) -> str:
        """What the trained weights depend on (a resume file must match it): not the device."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return repr({k: v for k, v in fields.items() if k not in RUNTIME_KNOBS})


def lr_at(epoch_progress: float, cfg: TrainConfig) -> float:
    """MAE's ``adjust_learning_rate``: linear warm-up, then half-cycle cosine to ``min_lr``."""
    if epoch_progress < cfg.warmup_epochs:
        return cfg.lr * epoch_progress / cfg.warmup_epochs
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-8)
    cos = 0.5 * (1.0 + math.cos(math.pi * (epoch_progress - cfg.warmup_epochs) / span))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * cos


def param_groups(params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and 1-d tokens (timm's ``param_groups_weight_decay``)."""
    decay, no_decay = [], []
    for _, p in params:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def augment(batch: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """RandomResizedCrop + horizontal flip of each uint8 image, from torch's global RNG."""
    from torchvision.transforms import v2

    size = batch.shape[-1]
    tf = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=cfg.crop_scale, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    )
    return torch.stack([tf(img) for img in batch])
