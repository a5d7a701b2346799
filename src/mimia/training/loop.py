"""The training loop: one for every engine (one process, DDP, DP-SGD).

Per epoch: the engine's batches; per step the learning rate of the schedule, the recipe's
augmentation, random masks from the engine's generator and the engine's backward step; then a
history row, a resume file every ``checkpoint_every`` epochs and the epoch hooks (early
stopping), any of which may end the run.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from mimia.masking import random_masks
from mimia.models.base import MIMModel
from mimia.training.recipe import TrainConfig, augment, lr_at
from mimia.training.resume import COMMON_KEYS, read_resume, save_resume


class EpochHook(Protocol):
    def after_epoch(self, epoch: int, model: MIMModel, device: torch.device) -> bool:
        """Called after every epoch (on every rank); True ends the run there."""


def fit(
    model: MIMModel,
    images: torch.Tensor,
    cfg: TrainConfig,
    engine,
    resume_path: str | Path | None = None,
    fingerprint: str = "",
    hooks: Sequence[EpochHook] = (),
    stop_after_epoch: int | None = None,
) -> list[dict]:
    """Train ``model`` on uint8 ``images [N, C, H, W]`` with ``engine`` (see
    :mod:`mimia.training.engines`); returns the per-epoch history.

    A resume file whose ``fingerprint`` (of the data, config and engine) differs is not
    resumed. ``stop_after_epoch`` ends the run early, as a kill would (resume tests).
    """
    engine.prepare(model, images, cfg)
    try:
        return _epochs(model, cfg, engine, resume_path, fingerprint, hooks, stop_after_epoch)
    finally:
        engine.close()
        model.eval()


def _epochs(model, cfg, engine, resume_path, fingerprint, hooks, stop_after_epoch):
    optimizer = engine.optimizer
    history: list[dict] = []
    start_epoch = 0
    resume_path = Path(resume_path) if resume_path else None
    keys = (*COMMON_KEYS, *engine.generator_keys, *engine.extra_keys)
    generators = (*engine.generator_keys, "torch_rng")
    state = None
    if resume_path:
        state = read_resume(resume_path, fingerprint, model, optimizer, keys, generators)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        engine.load_state(state)
        torch.set_rng_state(state["torch_rng"])
        history, start_epoch = state["history"], state["epoch"] + 1
        print(f"resumed from {resume_path} after epoch {state['epoch']}", file=sys.stderr)
    forward = engine.wrap(model)
    spec = model.spec
    for epoch in range(start_epoch, cfg.epochs):
        t0, total, count = time.perf_counter(), 0.0, 0
        bar = tqdm(
            engine.batches(),
            total=engine.steps,
            desc=f"epoch {epoch}",
            file=sys.stderr,
            leave=True,  # one bar per epoch stays in the rule's log
            mininterval=10.0,
            disable=not engine.is_main,
        )
        optimizer.zero_grad(set_to_none=True)
        for step, batch in enumerate(bar):
            if step % cfg.accum_iter == 0:
                lr = lr_at(epoch + step / engine.steps, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
            if cfg.augment and len(batch):
                batch = augment(batch, cfg)
            mask = random_masks(
                batch.shape[0],
                spec.num_patches,
                cfg.mask_ratio,
                generator=engine.mask_generator,
                block_size=spec.mask_block,
            )
            loss, n = engine.step(forward, step, batch, mask)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at epoch {epoch} step {step}")
            total, count = total + loss, count + n
        row = {
            "epoch": epoch,
            "loss": total / max(count, 1),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
            **engine.epoch_record(),
        }
        history.append(row)
        if engine.is_main:
            extra = "".join(f" {k} {v}" for k, v in row.items() if k not in _LOGGED)
            print(f"epoch {epoch} loss {row['loss']:.5f}{extra}", file=sys.stderr)
        last = epoch + 1 == cfg.epochs
        if engine.is_main and resume_path and ((epoch + 1) % cfg.checkpoint_every == 0 or last):
            save_resume(
                resume_path,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    **engine.resume_state(),
                    "torch_rng": torch.get_rng_state(),
                    "epoch": epoch,
                    "history": history,
                    "fingerprint": fingerprint,
                },
            )
        stop = [hook.after_epoch(epoch, model, engine.device) for hook in hooks]
        if hooks:
            model.train()
        if any(stop) or (stop_after_epoch is not None and epoch >= stop_after_epoch):
            break
    return history


_LOGGED = ("epoch", "loss", "lr", "seconds")
