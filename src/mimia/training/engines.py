"""Training engines: what differs between one process, DDP and DP-SGD, around one loop.

An engine prepares the model, optimizer and batches (the shape of Opacus'
``make_private(module, optimizer, data_loader)``), owns its random generators and any extra
resume state, and does the backward step. :func:`mimia.training.loop.fit` does the rest: the
schedule, augmentation, masks, history, resume files and epoch hooks, alike for every engine.

Each engine keeps the generator layout it has always had, so a seed gives the same weights as
before: :class:`Plain` and :class:`DDP` draw the data order and the masks from one generator
seeded with the run's seed; DP-SGD (:mod:`mimia.training.dp`) draws Poisson sampling, masks
and noise from three.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from mimia.devices import autocast, resolve_device
from mimia.training import ranks
from mimia.training.recipe import TrainConfig, param_groups


class Plain:
    """One process: AdamW on the trainable parameters, gradient accumulation, the config's
    precision (bf16 autocast on CUDA by default), ``torch.compile`` when asked."""

    generator_keys: tuple[str, ...] = ("generator",)
    """Resume-file keys of the engine's generator states (torch's global one is common)."""
    extra_keys: tuple[str, ...] = ()
    """Resume-file keys of the engine's other state."""

    def __init__(self, trainable: Iterable[tuple[str, nn.Parameter]] | None = None) -> None:
        self.trainable = None if trainable is None else list(trainable)

    @property
    def is_main(self) -> bool:
        """Whether this process logs and writes the resume file."""
        return True

    def check(self, images: torch.Tensor, cfg: TrainConfig) -> None:
        """Refuse what this engine cannot run, before any work."""
        if cfg.devices != 1:
            raise ValueError(f"devices={cfg.devices} but this process trains alone")

    def prepare(self, model: nn.Module, images: torch.Tensor, cfg: TrainConfig) -> None:
        self.check(images, cfg)
        self.cfg, self.images = cfg, images
        self.device = ranks.local_device(resolve_device(cfg.device))
        model.to(self.device).train()
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        named = self.trainable if self.trainable is not None else list(model.named_parameters())
        self.optimizer = torch.optim.AdamW(
            param_groups(named, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas
        )
        self.global_batch = cfg.batch_size * ranks.world()[1]
        self.steps = max(images.shape[0] // self.global_batch, 1)  # drop_last, as MAE's loader
        self.autocast = autocast(self.device, cfg.precision)

    @property
    def mask_generator(self) -> torch.Generator:
        return self.gen

    def resume_state(self) -> dict:
        return {"generator": self.gen.get_state()}

    def load_state(self, state: dict) -> None:
        self.gen.set_state(state["generator"])

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the steps call (after any resume state is loaded)."""
        return torch.compile(model) if self.cfg.compile else model

    def batches(self) -> Iterator[torch.Tensor]:
        """One epoch's uint8 batches: a seeded permutation, the last partial batch dropped."""
        order = torch.randperm(self.images.shape[0], generator=self.gen)
        for step in range(self.steps):
            yield self.images[order[step * self.global_batch : (step + 1) * self.global_batch]]

    def own_part(self, batch: torch.Tensor, mask: torch.Tensor):
        return batch, mask

    def sync_context(self, forward: nn.Module, sync: bool):
        return contextlib.nullcontext()

    def step(self, forward: nn.Module, step: int, batch: torch.Tensor, mask: torch.Tensor):
        """Forward and backward of one (micro-)batch; the optimizer steps once every
        ``accum_iter`` of them. Returns ``(loss summed over what it counts, count)``."""
        batch, mask = self.own_part(batch, mask)
        batch = batch.to(self.device, non_blocking=True).float().div_(255)
        mask = mask.to(self.device)
        accum = self.cfg.accum_iter
        sync = (step + 1) % accum == 0 or step + 1 == self.steps
        with self.sync_context(forward, sync):
            with self.autocast:
                loss = forward(batch, mask)[0].mean()
            global_loss = ranks.mean_over_ranks(loss.detach()).item()
            (loss / accum).backward()
        if sync:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return global_loss, 1

    def epoch_record(self) -> dict:
        """Extra columns of this epoch's history row."""
        return {}

    def close(self) -> None:
        pass


class DDP(Plain):
    """Rank ``RANK`` of ``devices`` processes (started by :mod:`mimia.training.launch`).

    Every rank draws the whole global batch of ``batch_size * devices`` images, its
    augmentations and masks from the same generators, then keeps its own slice: the random
    streams stay in step and the loss trajectory is the one-process trajectory on the global
    batch up to float rounding. Gradients are averaged over ranks on the micro-step that
    updates only (``no_sync`` before it).
    """

    @property
    def is_main(self) -> bool:
        return ranks.world()[0] == 0

    def check(self, images: torch.Tensor, cfg: TrainConfig) -> None:
        world_size = ranks.world()[1]
        if world_size != cfg.devices:
            raise ValueError(
                f"devices={cfg.devices} but this process group has {world_size} processes"
            )

    def wrap(self, model: nn.Module) -> nn.Module:
        device = self.device
        # Averages gradients over ranks in backward: the step sees the global batch's gradient.
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        return super().wrap(ddp)

    def own_part(self, batch: torch.Tensor, mask: torch.Tensor):
        rank, bs = ranks.world()[0], self.cfg.batch_size
        mine = slice(rank * bs, (rank + 1) * bs)
        return batch[mine], mask[mine]

    def sync_context(self, forward: nn.Module, sync: bool):
        return contextlib.nullcontext() if sync else forward.no_sync()


def check_global_batch(images: torch.Tensor, cfg: TrainConfig) -> None:
    """Refuse fewer images than one global batch of ``devices`` processes."""
    if cfg.devices > 1 and images.shape[0] < cfg.batch_size * cfg.devices:
        raise ValueError(
            f"{images.shape[0]} training images are fewer than one global batch of "
            f"{cfg.batch_size * cfg.devices} ({cfg.devices} processes x batch_size "
            f"{cfg.batch_size})"
        )
