"""Early stopping on a held-out reconstruction loss (Goodfellow et al. 2016, Algorithm 7.2).

A seeded slice of the training images is held out; a selection run trains on the rest, and an
epoch hook scores the slice every few epochs and ends the run after ``patience`` checks without
improvement; the model then trains on all of its images for the epoch count that scored best,
so every audited member was trained on.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np
import torch

from mimia.models.base import MIMModel
from mimia.models.scoring import score_batch
from mimia.training import ranks


def holdout_split(sample_ids: Sequence[str], fraction: float, seed: int) -> list[str]:
    """A seeded ``fraction`` of ``sample_ids`` (at least one), sorted."""
    ids = sorted(sample_ids)
    k = max(1, math.ceil(fraction * len(ids)))
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in order[:k])


def heldout_loss(
    model: MIMModel, images: torch.Tensor, sample_ids: Sequence[str], seed: int, cfg, num_masks: int
) -> float:
    """Mean masked reconstruction loss under fixed keyed masks (the same at every check)."""
    model.eval()
    errors = [
        score_batch(
            model, images[i : i + 256], sample_ids[i : i + 256], seed, cfg.mask_ratio, num_masks
        )["error"]
        for i in range(0, len(sample_ids), 256)
    ]
    return float(torch.cat(errors).mean())


class EarlyStopping:
    """The selection run's epoch hook: every ``early.every`` epochs the held-out images' loss
    (``early.num_masks`` keyed masks each); the run ends after ``early.patience`` checks without
    an improvement of more than ``early.min_delta``. ``best_epoch`` and ``curve`` say what it
    saw. On several ranks each scores the slice and rank 0's decision holds for all."""

    def __init__(self, images: torch.Tensor, sample_ids: Sequence[str], cfg, early: dict) -> None:
        self.images, self.sample_ids, self.cfg, self.early = images, list(sample_ids), cfg, early
        self.curve: list[dict] = []
        self.best_epoch: int | None = None
        self.best, self.waited = math.inf, 0

    def after_epoch(self, epoch: int, model: MIMModel, device: torch.device) -> bool:
        early = self.early
        if (epoch + 1) % early["every"]:
            return False
        loss = heldout_loss(
            model, self.images, self.sample_ids, self.cfg.seed, self.cfg, early["num_masks"]
        )
        self.curve.append({"epoch": epoch, "heldout_loss": loss})
        print(f"early stopping: epoch {epoch} held-out loss {loss:.5f}", file=sys.stderr)
        if loss < self.best - early["min_delta"]:
            self.best_epoch, self.best, self.waited = epoch, loss, 0
        else:
            self.waited += 1
        return ranks.rank0_decides(self.waited >= early["patience"], device)

    def payload(self) -> dict:
        """What a DDP worker needs to run this hook (tensors and plain values)."""
        return {"images": self.images, "sample_ids": self.sample_ids, "early": self.early}

    @classmethod
    def from_payload(cls, payload: dict, cfg) -> EarlyStopping:
        return cls(payload["images"], payload["sample_ids"], cfg, payload["early"])

    def result(self) -> dict:
        return {"curve": self.curve, "best_epoch": self.best_epoch}

    def load_result(self, result: dict) -> None:
        self.curve, self.best_epoch = result["curve"], result["best_epoch"]
