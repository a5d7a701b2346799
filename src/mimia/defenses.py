"""Defenses against membership inference as pre-training settings of the target model.

``pretrain.dp``: DP-SGD with Opacus (Poisson sampling, per-sample clipping, Gaussian noise, a
privacy accountant). Opacus' hooks compute the per-sample gradients of every layer it has a
grad sampler for (the ViT's patch embedding, linears and layer norms); the ViT's cls token and
the decoders' mask tokens are parameters of modules whose ``forward`` the MIM recipes never
call, which Opacus' hooks (and its functorch fallback, which re-runs a module's ``forward``)
cannot see. They are broadcast tokens (leading dimension 1), so each batch runs with a
per-sample copy of each token, and the gradient of the summed loss with respect to copy ``i``
is exactly sample ``i``'s gradient. ``tests/test_defenses.py`` checks every parameter's
per-sample gradient against one backward pass per sample.

``pretrain.early_stopping``: a seeded slice of the training images is held out; a selection
run trains on the rest and scores the slice every few epochs; the model then trains on all of
its images for the epoch count that scored best (Goodfellow et al. 2016, Algorithm 7.2), so
every audited member was trained on.

``shadow.knows_defense``: whether the adversary's shadow and reference models are trained
with the target's defense or without it (then with ``shadow.pretrain`` over the target's
other settings).

Importing this module loads neither torch nor Opacus: the workflow reads the config part of it
while it builds the DAG.
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mimia.layout import TARGET

if TYPE_CHECKING:
    import torch

    from mimia.models.base import MIMModel
    from mimia.pretrain import TrainConfig

DEFENSE_KEYS = ("dp", "early_stopping")
"""``pretrain`` keys that are defenses rather than the recipe's settings."""


# -- config -------------------------------------------------------------------------------------
def split_defenses(train: dict) -> tuple[dict, dict | None, dict | None]:
    """A ``pretrain`` section as ``(recipe settings, dp, early_stopping)``."""
    recipe = {k: v for k, v in train.items() if k not in DEFENSE_KEYS}
    return recipe, train.get("dp"), train.get("early_stopping")


def model_pretrain(exp: dict, model: str) -> dict:
    """The ``pretrain`` section ``model`` trains with: the target's own; a shadow model's is the
    same when the adversary knows the defense, else the target's without ``dp`` and
    ``early_stopping`` and with ``shadow.pretrain`` merged over it."""
    from mimia.config import canonical, deep_merge

    section = exp["pretrain"]
    if model == TARGET or exp["shadow"]["knows_defense"]:
        return canonical(section)
    recipe, _, _ = split_defenses(section)
    return canonical(deep_merge(recipe, exp["shadow"]["pretrain"]))


def check_defenses(exp: dict) -> None:
    """Cross-field checks of the defense settings (part of config resolution); ValueError
    naming the key."""
    shadow = exp["shadow"]
    if shadow["knows_defense"] and shadow["pretrain"]:
        raise ValueError(
            f"shadow.pretrain {shadow['pretrain']} is what an adversary who does not know the "
            f"defense assumes; with shadow.knows_defense true the shadow models train with "
            f"the target's pretrain section: set knows_defense false or drop shadow.pretrain"
        )
    sections = {"pretrain": exp["pretrain"]}
    if not shadow["knows_defense"]:
        sections["pretrain for the shadow models"] = model_pretrain(exp, "shadow0")
        _check_train_section(sections["pretrain for the shadow models"])
    smallest_role = min(exp["split"][r] for r in ("target_member", "shadow_member"))
    for where, section in sections.items():
        _, dp, early = split_defenses(section)
        if dp is not None:
            if ("noise_multiplier" in dp) == ("target_epsilon" in dp):
                raise ValueError(
                    f"{where}.dp needs exactly one of noise_multiplier and target_epsilon, "
                    f"got {sorted(dp)}"
                )
            if section["accum_iter"] != 1:
                raise ValueError(
                    f"{where}.dp: Poisson sampling draws a fresh batch every step, so "
                    f"accum_iter must be 1 (got {section['accum_iter']}); raise batch_size"
                )
            if early is not None:
                raise ValueError(
                    f"{where}: dp and early_stopping together would choose the epoch count on "
                    f"private images outside the accountant; use pretrain.epochs with dp"
                )
        if early is not None:
            kept = smallest_role - math.ceil(early["holdout"] * smallest_role)
            if kept < section["batch_size"]:
                raise ValueError(
                    f"{where}.early_stopping.holdout={early['holdout']} leaves {kept} training "
                    f"images, fewer than batch_size={section['batch_size']}"
                )


def _check_train_section(section: dict) -> None:
    from mimia.config import check_section

    try:
        check_section("pretrain", section)
    except ValueError as err:
        raise ValueError(f"shadow.pretrain: {err}") from None


def describe(exp: dict) -> dict[str, Any]:
    """The defense settings of an experiment, flat, for tables and figure labels."""
    section = exp["pretrain"]
    _, dp, early = split_defenses(section)
    return {
        "dp_noise_multiplier": None if dp is None else dp.get("noise_multiplier"),
        "dp_target_epsilon": None if dp is None else dp.get("target_epsilon"),
        "dp_max_grad_norm": None if dp is None else dp["max_grad_norm"],
        "epochs": section["epochs"],
        "augment": section["augment"],
        "weight_decay": section["weight_decay"],
        "mask_ratio": section["mask_ratio"],
        "early_stopping": early is not None,
        "knows_defense": exp["shadow"]["knows_defense"],
    }


# -- DP-SGD -------------------------------------------------------------------------------------
def _register_timm_layers() -> None:
    """timm's ``LayerNorm`` is ``nn.LayerNorm`` computing ``F.layer_norm`` (fused or not);
    Opacus looks grad samplers up by exact type, so it gets ``nn.LayerNorm``'s."""
    from opacus.grad_sample import GradSampleModule
    from timm.layers.norm import LayerNorm
    from torch import nn

    samplers = GradSampleModule.GRAD_SAMPLERS
    samplers.setdefault(LayerNorm, samplers[nn.LayerNorm])


def _token_parameters(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, Any]]:
    """Trainable parameters owned by modules Opacus has no grad sampler for, by name.

    Each must be a broadcast token (leading dimension 1): its per-sample gradient comes from a
    per-sample copy (see the module docstring). Anything else is refused by name.
    """
    from opacus.grad_sample import GradSampleModule

    _register_timm_layers()
    tokens = {}
    for module_name, module in model.named_modules():
        if type(module) in GradSampleModule.GRAD_SAMPLERS:
            continue
        for param_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            name = f"{module_name}.{param_name}" if module_name else param_name
            if p.ndim < 2 or p.shape[0] != 1:
                raise ValueError(
                    f"DP training cannot compute per-sample gradients of parameter {name} "
                    f"{tuple(p.shape)}: Opacus has no grad sampler for "
                    f"{type(module).__name__} and it is not a broadcast token [1, ...]"
                )
            tokens[name] = (module, p)
    return tokens


def _grad_sample_module(model: torch.nn.Module, owners: set[int]):
    """Opacus' hooks on every layer it has a grad sampler for, below the token owners too."""
    import torch
    from opacus.grad_sample import GradSampleModule

    class LayerHooks(GradSampleModule):
        def iterate_submodules(self, module):
            if id(module) in owners:  # their own parameters are tokens: see _token_parameters
                for child in module.children():
                    yield from self.iterate_submodules(child)
            else:
                yield from super().iterate_submodules(module)

        def capture_activations_hook(self, module, forward_input, forward_output):
            # Opacus' conv grad sampler unfolds activations with as_strided, which assumes a
            # contiguous tensor: SimMIM's head gets a transposed feature map (wrong without this).
            inputs = [t.contiguous() if isinstance(t, torch.Tensor) else t for t in forward_input]
            super().capture_activations_hook(module, inputs, forward_output)

    # Opacus refuses trainable modules holding buffers (BatchNorm statistics would leak); the
    # MIM models' only buffers are the fixed pixel mean and std, so the check is done here.
    buffers = [n for n, _ in model.named_buffers() if n not in ("pixel_mean", "pixel_std")]
    if buffers:
        raise ValueError(f"DP training does not support models with buffers {buffers}")
    return LayerHooks(model, batch_first=True, loss_reduction="sum", strict=False)


class PerSampleGradients:
    """Per-sample gradients of a MIM model's masked loss, as Opacus' optimizer reads them.

    ``step(images, mask)`` runs one forward and backward pass and leaves every trainable
    parameter's ``grad_sample`` ``[B, *shape]``: the gradient of each sample's own loss.
    """

    def __init__(self, model: MIMModel) -> None:
        self.model = model
        self.tokens = _token_parameters(model)
        self.hooks = _grad_sample_module(model, {id(m) for m, _ in self.tokens.values()})
        self.params = [p for p in model.parameters() if p.requires_grad]

    def step(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-sample losses ``[B]`` of images in [0, 1]; grad samples set as a side effect."""
        import torch

        b = images.shape[0]
        if b == 0:  # Poisson sampling may draw an empty batch: noise only
            for p in self.params:
                p.grad_sample = torch.zeros(0, *p.shape, dtype=p.dtype, device=p.device)
            return torch.zeros(0, device=images.device)
        copies = {
            name: p.detach().expand(b, *p.shape[1:]).clone().requires_grad_(True)
            for name, (_, p) in self.tokens.items()
        }
        losses = torch.func.functional_call(self.model, copies, (images, mask))[0]
        with warnings.catch_warnings():
            # The patch embedding's input needs no gradient; its weight's hook still fires.
            warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
            losses.sum().backward()
        for name, (_, p) in self.tokens.items():
            p.grad_sample = copies[name].grad.reshape(b, *p.shape)
        return losses.detach()

    def close(self) -> None:
        self.hooks.remove_hooks()
        self.hooks.cleanup()


def noise_multiplier_for(dp: dict, sample_rate: float, steps: int) -> float:
    """``dp.noise_multiplier``, or the one Opacus finds for ``dp.target_epsilon``."""
    if "noise_multiplier" in dp:
        return float(dp["noise_multiplier"])
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=dp["target_epsilon"],
            target_delta=dp["delta"],
            sample_rate=sample_rate,
            steps=steps,
            accountant=dp["accountant"],
        )
    )


# The random streams a DP run resumes: Poisson sampling, masks, noise, torch's global one.
_DP_RESUME_GENERATORS = ("sampling", "masking", "noising", "torch_rng")
_DP_RESUME_KEYS = (
    "model",
    "optimizer",
    *_DP_RESUME_GENERATORS,
    "accountant",
    "epoch",
    "history",
    "fingerprint",
)


def train_dp(
    model: MIMModel,
    images: torch.Tensor,
    cfg: TrainConfig,
    dp: dict,
    resume_path: str | Path | None = None,
    fingerprint: str = "",
    stop_after_epoch: int | None = None,
) -> tuple[list[dict], dict]:
    """DP-SGD pre-training of ``model`` on uint8 ``images [N, C, H, W]``.

    The recipe of :func:`mimia.pretrain.train_mim` (AdamW, lr = blr * batch / 256 with warm-up
    and cosine per step, augmentation, per-sample random masks from a seeded generator), with
    Opacus' Poisson sampling (each image joins each step with probability batch_size / N,
    N / batch_size steps per epoch), per-sample clipping to ``dp.max_grad_norm`` and Gaussian
    noise of ``noise_multiplier * max_grad_norm`` on the summed gradient, averaged over the
    expected batch size. Float32, no compile (Opacus' hooks). Resumable like ``train_mim``.

    Returns the per-epoch history and the privacy record: the accountant's epsilon at
    ``dp.delta`` (None when the noise multiplier is 0: no guarantee), the noise multiplier
    used, sample rate, steps.
    """
    import torch
    from opacus.accountants import create_accountant
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer
    from torch.utils.data import TensorDataset
    from tqdm import tqdm

    from mimia.devices import resolve_device
    from mimia.masking import random_masks
    from mimia.pretrain import _augment, lr_at, param_groups, read_resume, save_resume

    if cfg.accum_iter != 1:
        raise ValueError(f"DP training needs accum_iter 1, got {cfg.accum_iter}")
    device = resolve_device(cfg.device)
    model.to(device).train()
    torch.manual_seed(cfg.seed)
    n = images.shape[0]
    sample_rate = cfg.batch_size / n
    sampling = torch.Generator().manual_seed(cfg.seed)
    masking = torch.Generator().manual_seed(cfg.seed + 1)
    noising = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    loader = DPDataLoader(TensorDataset(images), sample_rate=sample_rate, generator=sampling)
    steps = len(loader)
    sigma = noise_multiplier_for(dp, sample_rate, steps * cfg.epochs)
    grads = PerSampleGradients(model)
    optimizer = DPOptimizer(
        torch.optim.AdamW(
            param_groups(model.named_parameters(), cfg.weight_decay), lr=cfg.lr, betas=cfg.betas
        ),
        noise_multiplier=sigma,
        max_grad_norm=float(dp["max_grad_norm"]),
        expected_batch_size=cfg.batch_size,
        loss_reduction="mean",
        generator=noising,
    )
    accountant = create_accountant(mechanism=dp["accountant"])
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))

    history: list[dict] = []
    start_epoch = 0
    resume_path = Path(resume_path) if resume_path else None
    generators = {"sampling": sampling, "masking": masking, "noising": noising}
    state = None
    if resume_path:
        state = read_resume(
            resume_path,
            fingerprint,
            model,
            optimizer,
            keys=_DP_RESUME_KEYS,
            generators=_DP_RESUME_GENERATORS,
        )
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for key, gen in generators.items():
            gen.set_state(state[key])
        torch.set_rng_state(state["torch_rng"])
        accountant.load_state_dict(state["accountant"])
        history, start_epoch = state["history"], state["epoch"] + 1
        print(f"resumed from {resume_path} after epoch {state['epoch']}", file=sys.stderr)

    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0, total, count = time.perf_counter(), 0.0, 0
            bar = tqdm(
                enumerate(loader), total=steps, desc=f"epoch {epoch}", file=sys.stderr,
                mininterval=10.0,
            )  # fmt: skip
            for step, (batch,) in bar:
                lr = lr_at(epoch + step / steps, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if cfg.augment and len(batch):
                    batch = _augment(batch, cfg)
                batch = batch.to(device).float().div_(255)
                mask = random_masks(
                    batch.shape[0],
                    model.spec.num_patches,
                    cfg.mask_ratio,
                    generator=masking,
                    block_size=model.spec.mask_block,
                ).to(device)
                losses = grads.step(batch, mask)
                if not bool(torch.isfinite(losses).all()):
                    raise FloatingPointError(f"loss is not finite at epoch {epoch} step {step}")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                total, count = total + float(losses.sum()), count + len(losses)
            epsilon = _epsilon(accountant, sigma, dp["delta"])
            history.append(
                {
                    "epoch": epoch,
                    "loss": total / max(count, 1),
                    "lr": optimizer.param_groups[0]["lr"],
                    "seconds": time.perf_counter() - t0,
                    "epsilon": math.inf if epsilon is None else epsilon,
                }
            )
            print(
                f"epoch {epoch} loss {history[-1]['loss']:.5f} epsilon {epsilon}", file=sys.stderr
            )
            last = epoch + 1 == cfg.epochs
            if resume_path and ((epoch + 1) % cfg.checkpoint_every == 0 or last):
                save_resume(
                    resume_path,
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        **{k: g.get_state() for k, g in generators.items()},
                        "torch_rng": torch.get_rng_state(),
                        "accountant": accountant.state_dict(),
                        "epoch": epoch,
                        "history": history,
                        "fingerprint": fingerprint,
                    },
                )
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                break
    finally:
        grads.close()
    model.eval()
    privacy = {
        "epsilon": _epsilon(accountant, sigma, dp["delta"]),
        "delta": float(dp["delta"]),
        "noise_multiplier": sigma,
        "max_grad_norm": float(dp["max_grad_norm"]),
        "target_epsilon": dp.get("target_epsilon"),
        "accountant": dp["accountant"],
        "sample_rate": sample_rate,
        "expected_batch_size": cfg.batch_size,
        "steps": sum(h[2] for h in accountant.history),
        "sampling": "poisson",
        "secure_mode": False,
    }
    return history, privacy


def _epsilon(accountant, sigma: float, delta: float) -> float | None:
    """The accountant's epsilon so far; None without noise (no guarantee: epsilon = inf)."""
    if sigma == 0:
        return None
    if not accountant.history:
        return 0.0
    return float(accountant.get_epsilon(delta=delta))


# -- early stopping -----------------------------------------------------------------------------
def holdout_split(sample_ids: Sequence[str], fraction: float, seed: int) -> list[str]:
    """A seeded ``fraction`` of ``sample_ids`` (at least one), sorted."""
    import numpy as np

    ids = sorted(sample_ids)
    k = max(1, math.ceil(fraction * len(ids)))
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in order[:k])


def heldout_loss(
    model: MIMModel, images: torch.Tensor, sample_ids: Sequence[str], seed: int, cfg, num_masks: int
) -> float:
    """Mean masked reconstruction loss under fixed keyed masks (the same at every check)."""
    from mimia.extract import score_batch

    model.eval()
    errors = [
        score_batch(
            model, images[i : i + 256], sample_ids[i : i + 256], seed, cfg.mask_ratio, num_masks
        )["error"]
        for i in range(0, len(sample_ids), 256)
    ]
    import torch

    return float(torch.cat(errors).mean())


def train_early_stopped(
    model: MIMModel,
    images: torch.Tensor,
    sample_ids: Sequence[str],
    cfg: TrainConfig,
    early: dict,
    resume_path: str | Path | None = None,
    fingerprint: str = "",
) -> tuple[list[dict], dict]:
    """Early stopping on a held-out reconstruction loss, then training on every image.

    Selection run: a copy of the freshly initialised ``model`` trains with ``train_mim`` on the
    images outside a seeded ``early.holdout`` slice; every ``early.every`` epochs the slice's
    loss (``early.num_masks`` keyed masks per image) is measured, and the run stops after
    ``early.patience`` checks without an improvement of more than ``early.min_delta``. Final
    run: ``model`` trains on all images with the same schedule and stops after the best
    epoch. Returns the final run's history and the record (held-out ids, the curve, the
    chosen epoch).
    """
    import dataclasses

    from mimia.pretrain import train_mim

    if len(sample_ids) != images.shape[0]:
        raise ValueError(f"{len(sample_ids)} sample ids for {images.shape[0]} images")
    held = set(holdout_split(sample_ids, early["holdout"], cfg.seed))
    pick_held = [i for i, s in enumerate(sample_ids) if s in held]
    pick_train = [i for i, s in enumerate(sample_ids) if s not in held]
    held_ids = [sample_ids[i] for i in pick_held]
    every, patience = early["every"], early["patience"]
    selection = copy.deepcopy(model)
    select_cfg = dataclasses.replace(cfg, checkpoint_every=every)
    curve: list[dict] = []
    best_epoch, best, waited = None, math.inf, 0
    # The selection run goes on from check to check through train_mim's resume file, in a
    # temporary folder: after a kill it restarts from scratch (its checks are not in the file).
    where = Path(resume_path).parent if resume_path else None
    if where:
        where.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=where, prefix="early-stopping-") as tmp:
        select_resume = Path(tmp) / "resume.pt"
        for end in range(every - 1, cfg.epochs, every):
            train_mim(
                selection,
                images[pick_train],
                select_cfg,
                resume_path=select_resume,
                stop_after_epoch=end,
                fingerprint=f"{fingerprint}|selection",
            )
            loss = heldout_loss(
                selection, images[pick_held], held_ids, cfg.seed, cfg, early["num_masks"]
            )
            curve.append({"epoch": end, "heldout_loss": loss})
            print(f"early stopping: epoch {end} held-out loss {loss:.5f}", file=sys.stderr)
            if loss < best - early["min_delta"]:
                best_epoch, best, waited = end, loss, 0
            else:
                waited += 1
                if waited >= patience:
                    break
    if best_epoch is None:  # fewer epochs than one check: train them all
        best_epoch = cfg.epochs - 1
    history = train_mim(
        model,
        images,
        cfg,
        resume_path=resume_path,
        stop_after_epoch=best_epoch,
        fingerprint=f"{fingerprint}|final",
    )
    record = {
        "holdout_fraction": early["holdout"],
        "holdout_ids": held_ids,
        "num_holdout": len(held_ids),
        "num_selection_train": len(pick_train),
        "curve": curve,
        "best_epoch": best_epoch,
        "epochs_trained": best_epoch + 1,
        "stopped_early": best_epoch + 1 < cfg.epochs,
        "final_run_images": int(images.shape[0]),
    }
    return history, record
