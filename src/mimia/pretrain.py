"""MIM pre-training as MAE's ``main_pretrain.py`` does it, resumable and deterministic on CPU.

AdamW (betas 0.9/0.95) with no weight decay on biases and norms, lr = blr * batch / 256,
per-iteration cosine schedule after a linear warm-up, optional RandomResizedCrop + flip,
gradient accumulation, bf16 autocast on CUDA. Every ``checkpoint_every`` epochs the model,
optimizer, RNG states and loss history go to a resume file; a killed run restarted with the
same arguments continues from there and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from mimia import devices, distributed
from mimia.masking import random_masks
from mimia.models.base import MIMModel

RUNTIME_KNOBS = ("device", "compile", "precision")


@dataclass(frozen=True)
class TrainConfig:
    """One training run's settings: a ``pretrain``/``adapt`` config section (whose defaults
    live in the experiment schema, see :meth:`from_section`) plus the seed and the runtime
    knobs ``device``, ``compile`` and ``precision``, which change how it runs, not what it
    computes (beyond float rounding)."""

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
    precision: str = "auto"  # devices.PRECISIONS: bf16 autocast on CUDA by default

    @classmethod
    def from_section(
        cls, section: dict, *, seed: int = 0, device: str = "auto", compile: bool = False
    ) -> TrainConfig:
        """From a config section; keys it leaves out take the schema's ``pretrain`` defaults."""
        from mimia.config import schema_defaults

        values = {**schema_defaults("pretrain"), **section}
        for key in ("betas", "crop_scale"):
            values[key] = tuple(values[key])
        return cls(seed=seed, device=device, compile=compile, **values)

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


def _augment(batch: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    from torchvision.transforms import v2

    size = batch.shape[-1]
    tf = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=cfg.crop_scale, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    )
    return torch.stack([tf(img) for img in batch])


def train_mim(
    model: MIMModel,
    images: torch.Tensor,
    cfg: TrainConfig,
    resume_path: str | Path | None = None,
    trainable: Iterable[tuple[str, nn.Parameter]] | None = None,
    stop_after_epoch: int | None = None,
    fingerprint: str = "",
) -> list[dict]:
    """Train ``model`` on uint8 ``images [N, C, H, W]``; returns the per-epoch history.

    ``trainable`` restricts the optimised parameters (decoder adaptation on a frozen encoder).
    ``stop_after_epoch`` ends the run early, as a kill would, for resume tests.
    A resume file whose ``fingerprint`` (of the data and config) differs is not resumed.

    ``cfg.devices > 1`` trains in that many processes (``mimia.distributed``), each on
    ``cfg.batch_size`` images of every global batch of ``batch_size * devices``: the data
    order, masks and augmentations are those of one process on the global batch, so the loss
    trajectory matches a one-process run with the global batch up to float rounding.
    """
    rank, world_size = distributed.world()
    if cfg.devices > 1 and images.shape[0] < cfg.batch_size * cfg.devices:
        raise ValueError(
            f"{images.shape[0]} training images are fewer than one global batch of "
            f"{cfg.batch_size * cfg.devices} ({cfg.devices} processes x batch_size "
            f"{cfg.batch_size})"
        )
    if cfg.devices > 1 and world_size == 1:
        return distributed.launch(
            model,
            images,
            cfg,
            resume_path=resume_path,
            trainable=trainable,
            stop_after_epoch=stop_after_epoch,
            fingerprint=fingerprint,
        )
    if world_size != cfg.devices:
        raise ValueError(f"devices={cfg.devices} but this process group has {world_size} processes")
    device = distributed.local_device(devices.resolve_device(cfg.device))
    model.to(device).train()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    named = list(trainable) if trainable is not None else list(model.named_parameters())
    optimizer = torch.optim.AdamW(param_groups(named, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    history: list[dict] = []
    start_epoch = 0
    resume_path = Path(resume_path) if resume_path else None
    state = read_resume(resume_path, fingerprint, model, optimizer) if resume_path else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, start_epoch = state["history"], state["epoch"] + 1
        print(f"resumed from {resume_path} after epoch {state['epoch']}", file=sys.stderr)

    forward = model
    if world_size > 1:
        # Averages gradients over ranks in backward: the step sees the global batch's gradient.
        forward = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    forward = torch.compile(forward) if cfg.compile else forward
    autocast = devices.autocast(device, cfg.precision)
    n, bs = images.shape[0], cfg.batch_size
    global_bs = bs * world_size
    steps = max(n // global_bs, 1)  # drop_last, as MAE's loader
    mine = slice(rank * bs, (rank + 1) * bs)
    for epoch in range(start_epoch, cfg.epochs):
        t0, total = time.perf_counter(), 0.0
        order = torch.randperm(n, generator=gen)
        bar = tqdm(
            range(steps),
            desc=f"epoch {epoch}",
            file=sys.stderr,
            leave=True,  # one bar per epoch stays in the rule's log
            mininterval=10.0,
            disable=rank != 0,
        )
        optimizer.zero_grad(set_to_none=True)
        for step in bar:
            if step % cfg.accum_iter == 0:
                lr = lr_at(epoch + step / steps, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
            # Every rank draws the whole global batch's augmentations and masks from the same
            # generators, then keeps its own slice: the random streams stay in step.
            batch = images[order[step * global_bs : (step + 1) * global_bs]]
            if cfg.augment:
                batch = _augment(batch, cfg)
            mask = random_masks(
                batch.shape[0],
                model.spec.num_patches,
                cfg.mask_ratio,
                generator=gen,
                block_size=model.spec.mask_block,
            )
            if world_size > 1:
                batch, mask = batch[mine], mask[mine]
            batch = batch.to(device, non_blocking=True).float().div_(255)
            mask = mask.to(device)
            sync = (step + 1) % cfg.accum_iter == 0 or step + 1 == steps
            # Gradients are averaged over ranks only on the micro-step that updates.
            no_sync = forward.no_sync() if world_size > 1 and not sync else contextlib.nullcontext()
            with no_sync:
                with autocast:
                    loss = forward(batch, mask)[0].mean()
                global_loss = distributed.mean_over_ranks(loss.detach()).item()
                if not math.isfinite(global_loss):
                    raise FloatingPointError(f"loss is {global_loss} at epoch {epoch} step {step}")
                (loss / cfg.accum_iter).backward()
            if sync:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total += global_loss
        history.append(
            {
                "epoch": epoch,
                "loss": total / steps,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - t0,
            }
        )
        if rank == 0:
            print(f"epoch {epoch} loss {total / steps:.5f}", file=sys.stderr)
        last = epoch + 1 == cfg.epochs
        if rank == 0 and resume_path and ((epoch + 1) % cfg.checkpoint_every == 0 or last):
            save_resume(
                resume_path,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "epoch": epoch,
                    "history": history,
                    "fingerprint": fingerprint,
                },
            )
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
    model.eval()
    return history


def save_resume(path: Path, state: dict) -> None:
    """Write a resume checkpoint (tensors and plain values only) atomically."""
    from mimia.storage import atomic_path

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


_GENERATORS = ("generator", "torch_rng")
_RESUME_KEYS = ("model", "optimizer", *_GENERATORS, "epoch", "history", "fingerprint")


def read_resume(
    path: Path,
    fingerprint: str,
    model,
    optimizer,
    keys: Sequence[str] = _RESUME_KEYS,
    generators: Sequence[str] = _GENERATORS,
) -> dict | None:
    """The resume state to continue from, or None to start at epoch 0.

    ``keys``: what the trainer's resume file holds; ``generators``: which of them are random
    generator states (DP training keeps more of both). A file that cannot be read or is not a
    resume file of this model (corrupt, truncated, foreign, a code-executing pickle) would
    block the run forever: it is moved aside to ``resume.pt.corrupt-N``, with a line in the log
    saying why. A resume file of other data or config is left alone (the next checkpoint
    replaces it).
    """
    if not path.exists():
        return None
    from mimia.models.checkpoint import torch_load_reason

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        why = _not_resume_file(state, keys)
    except Exception as e:  # whatever torch makes of a damaged file, training must go on
        reason = torch_load_reason(e) or "the data ends early"
        why = f"{path.stat().st_size} bytes; {type(e).__name__}: {reason}"
    if why is None and state["fingerprint"] != fingerprint:
        print(f"ignoring {path}: made for other data or config", file=sys.stderr)
        return None
    why = why or _does_not_fit(state, model, optimizer, generators)
    if why is None:
        return state
    n = 1
    while (aside := path.with_name(f"{path.name}.corrupt-{n}")).exists():
        n += 1
    os.replace(path, aside)
    print(
        f"resume file {path} is unusable ({why}); moved it to {aside} and starting from epoch 0",
        file=sys.stderr,
    )
    return None


def _not_resume_file(state, keys: Sequence[str]) -> str | None:
    if isinstance(state, dict) and set(keys) <= set(state):
        return None
    found = sorted(map(str, state))[:10] if isinstance(state, dict) else type(state).__name__
    return f"not a mimia resume file: expected keys {list(keys)}, found {found}"


def _does_not_fit(state: dict, model, optimizer, generators: Sequence[str]) -> str | None:
    """Why a resume file of this run's fingerprint cannot be loaded, or None."""
    mine, theirs = model.state_dict(), state["model"]
    if not isinstance(theirs, dict) or set(theirs) != set(mine):
        return "its model weights have other parameter names than this model"
    bad = [k for k, v in mine.items() if getattr(theirs[k], "shape", None) != v.shape]
    if bad:
        return f"its model weights have other shapes than this model ({', '.join(bad[:5])})"
    rng = [state[k] for k in generators]
    if not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in rng):
        return "its random generator states are not byte tensors"
    if not isinstance(state["epoch"], int) or not isinstance(state["history"], list):
        return "its epoch or history is malformed"
    opt = state["optimizer"]
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != sizes:
        return "its optimizer state is for other parameters"
    return None


def resume_path_for(weights_path: str | Path) -> Path:
    """Where a training run keeps its resume checkpoint: beside its final weights."""
    return Path(weights_path).with_name("resume.pt")


def save_trained(
    model: MIMModel, history: list[dict], info: dict, weights_path, log_table_path
) -> None:
    """Checkpoint, sidecar and training log of a finished run; then its resume file goes."""
    import polars as pl

    from mimia.models.checkpoint import save_model
    from mimia.provenance import provenance, write_parquet

    save_model(model, weights_path, info)
    write_parquet(pl.DataFrame(history), log_table_path, provenance(**info))
    resume_path_for(weights_path).unlink(missing_ok=True)
