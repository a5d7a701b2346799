"""Training entry points: :func:`run` (what the workflow's training rules call) and the three
ways to fit a model it chooses between (:func:`train_mim`, :func:`train_dp`,
:func:`train_early_stopped`).

:func:`run` holds the policy: which images a model trains on, its seed offset, what its resume
fingerprint covers, which engine and defense it trains with, and what its checkpoint, sidecar
and training log record. The target and shadow models and the ``adapted`` decoder all train
through it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from mimia.layout import SHADOW_ROLES, TARGET, TARGET_ROLES, adapted_base, shadow_index
from mimia.models.base import MIMModel
from mimia.schema import canonical
from mimia.training import ranks
from mimia.training.dp import DPSGD
from mimia.training.early_stopping import EarlyStopping, holdout_split
from mimia.training.engines import Plain, check_global_batch
from mimia.training.launch import launch
from mimia.training.loop import fit
from mimia.training.recipe import TrainConfig
from mimia.training.resume import fingerprint as join_fingerprint
from mimia.training.resume import resume_path_for

PathLike = str | Path

ADAPTED_SEED_OFFSET = 10_000
"""An adapted decoder's seed is its base model's plus this (the shadow models take 1 + i)."""


def seed_offset(model: str) -> int:
    """What ``model``'s training seed adds to the experiment's: the target 0, ``shadow{i}``
    1 + i, an adapted decoder :data:`ADAPTED_SEED_OFFSET` more than its base model."""
    if model == TARGET:
        return 0
    base = adapted_base(model)
    if base is not None:
        return ADAPTED_SEED_OFFSET + seed_offset(base)
    return 1 + shadow_index(model)


def train_mim(
    model: MIMModel,
    images: torch.Tensor,
    cfg: TrainConfig,
    resume_path: PathLike | None = None,
    trainable: Iterable[tuple[str, nn.Parameter]] | None = None,
    stop_after_epoch: int | None = None,
    fingerprint: str = "",
    early_stopping: EarlyStopping | None = None,
) -> list[dict]:
    """Train ``model`` on uint8 ``images [N, C, H, W]`` without a defense; returns the
    per-epoch history.

    ``trainable`` restricts the optimised parameters (decoder adaptation on a frozen encoder).
    ``cfg.devices > 1`` trains in that many processes (:mod:`mimia.training.launch`), each on
    ``cfg.batch_size`` images of every global batch of ``batch_size * devices``.
    """
    check_global_batch(images, cfg)
    trainable = None if trainable is None else list(trainable)
    if cfg.devices > 1 and ranks.world()[1] == 1:
        return launch(
            model,
            images,
            cfg,
            resume_path=resume_path,
            trainable=trainable,
            stop_after_epoch=stop_after_epoch,
            fingerprint=fingerprint,
            early_stopping=early_stopping,
        )
    hooks = [early_stopping] if early_stopping is not None else []
    return fit(
        model,
        images,
        cfg,
        Plain(trainable),
        resume_path=resume_path,
        fingerprint=fingerprint,
        hooks=hooks,
        stop_after_epoch=stop_after_epoch,
    )


def train_dp(
    model: MIMModel,
    images: torch.Tensor,
    cfg: TrainConfig,
    dp: dict,
    resume_path: PathLike | None = None,
    fingerprint: str = "",
    stop_after_epoch: int | None = None,
) -> tuple[list[dict], dict]:
    """DP-SGD pre-training of ``model`` (:class:`mimia.training.dp.DPSGD`).

    Returns the per-epoch history and the privacy record: the accountant's epsilon at
    ``dp.delta`` (None when the noise multiplier is 0: no guarantee), the noise multiplier
    used, sample rate, steps.
    """
    engine = DPSGD(dp)
    history = fit(
        model,
        images,
        cfg,
        engine,
        resume_path=resume_path,
        fingerprint=fingerprint,
        stop_after_epoch=stop_after_epoch,
    )
    return history, engine.privacy()


def train_early_stopped(
    model: MIMModel,
    images: torch.Tensor,
    sample_ids: Sequence[str],
    cfg: TrainConfig,
    early: dict,
    resume_path: PathLike | None = None,
    fingerprint: str = "",
) -> tuple[list[dict], dict]:
    """Early stopping on a held-out reconstruction loss, then training on every image.

    Selection run: a copy of the freshly initialised ``model`` trains with :func:`train_mim`
    on the images outside a seeded ``early.holdout`` slice, with the
    :class:`~mimia.training.early_stopping.EarlyStopping` hook ending it. Final run: ``model``
    trains on all images with the same schedule and stops after the best epoch; its resume
    fingerprint covers the early-stopping settings and that epoch, so a killed run resumed
    with other settings or another chosen epoch starts over rather than train the wrong
    number of epochs. The selection run keeps no resume file: after a kill it starts over.
    Returns the final run's history and the record (held-out ids, the curve, the chosen
    epoch).
    """
    if len(sample_ids) != images.shape[0]:
        raise ValueError(f"{len(sample_ids)} sample ids for {images.shape[0]} images")
    held = set(holdout_split(sample_ids, early["holdout"], cfg.seed))
    pick_held = [i for i, s in enumerate(sample_ids) if s in held]
    pick_train = [i for i, s in enumerate(sample_ids) if s not in held]
    held_ids = [sample_ids[i] for i in pick_held]
    hook = EarlyStopping(images[pick_held], held_ids, cfg, early)
    train_mim(copy.deepcopy(model), images[pick_train], cfg, early_stopping=hook)
    # Fewer epochs than one check: train them all.
    best_epoch = cfg.epochs - 1 if hook.best_epoch is None else hook.best_epoch
    final = join_fingerprint(fingerprint, f"early_stopping {canonical(early)}", best_epoch)
    history = train_mim(
        model,
        images,
        cfg,
        resume_path=resume_path,
        stop_after_epoch=best_epoch,
        fingerprint=f"{final}|final",
    )
    record = {
        "holdout_fraction": early["holdout"],
        "holdout_ids": held_ids,
        "num_holdout": len(held_ids),
        "num_selection_train": len(pick_train),
        "curve": hook.curve,
        "best_epoch": best_epoch,
        "epochs_trained": best_epoch + 1,
        "stopped_early": best_epoch + 1 < cfg.epochs,
        "final_run_images": int(images.shape[0]),
    }
    return history, record


def run(
    *,
    model: str,
    manifest: PathLike,
    shards: Sequence[PathLike],
    weights: PathLike,
    train_log: PathLike,
    train: dict,
    seed: int,
    runtime: dict,
    spec: dict | None = None,
    membership: PathLike | None = None,
    target: PathLike | None = None,
    shadow: PathLike | None = None,
) -> None:
    """Train ``model`` and write its checkpoint, sidecar and training log beside ``weights``.

    ``target``: on the ``target_member`` images. ``shadow{i}``: on the IN images of its
    ``membership`` file. Both from a fresh ``spec`` model, with ``train.dp`` /
    ``train.early_stopping`` selecting DP-SGD or early stopping. ``target-adapted``: the
    decoder of ``shadow`` (shadow0's checkpoint) fine-tuned on the frozen encoder of
    ``target`` (a checkpoint), on the adversary's images only (the shadow roles).
    ``shadow{i}-adapted`` (the usage audit's calibration of that mode): the same on reference
    model i's encoder, on the target roles' images, which it never trained on (offline), as
    the target's adapted decoder never saw the target's own members.

    ``runtime``: ``device``, ``compile``, ``precision`` and optionally ``checkpoint_every`` (how
    often resume files are written), which change how the run goes, not what it learns
    (``precision`` within bf16's rounding; the sidecar records the one used).
    """
    import polars as pl

    from mimia.data.shards import load_images
    from mimia.devices import resolve_device, resolve_precision
    from mimia.provenance import read_metadata

    rows = pl.read_parquet(manifest)
    info = {"model": model}
    base = adapted_base(model)
    if base is not None:
        roles = SHADOW_ROLES if base == TARGET else TARGET_ROLES
        ids = set(rows.filter(pl.col("role").is_in(roles))["sample_id"])
    elif model == TARGET:
        ids = set(rows.filter(pl.col("role") == "target_member")["sample_id"])
    else:
        table = pl.read_parquet(membership)
        ids = set(table.filter(pl.col("is_in"))["sample_id"])
    if not ids:
        raise ValueError(f"model {model!r} has no training images")
    sample_ids, images = load_images(shards, ids)
    recipe = {k: v for k, v in train.items() if k not in ("dp", "early_stopping")}
    dp, early = train.get("dp"), train.get("early_stopping")
    cfg = TrainConfig.from_section(
        recipe,
        seed=seed + seed_offset(model),
        device=runtime["device"],
        compile=runtime["compile"],
        precision=runtime.get("precision", "auto"),
    )
    if "checkpoint_every" in runtime:
        cfg = dataclasses.replace(cfg, checkpoint_every=runtime["checkpoint_every"])
    resume = resume_path_for(weights)
    if base is not None:
        net, history = _adapt(target, shadow, images, cfg, ids, resume, info)
        info |= {"adapt_config": train, "decoder_released": False}
    else:
        torch.manual_seed(cfg.seed)
        net = _fresh(spec)
        info |= {"train_config": train, "decoder_released": True}
        fingerprint = join_fingerprint(net.spec.to_dict(), cfg.fingerprint(), sorted(ids))
        if dp is not None:
            history, info["dp"] = train_dp(
                net, images, cfg, dp, resume, join_fingerprint("dp", canonical(dp), fingerprint)
            )
        elif early is not None:
            history, info["early_stopping"] = train_early_stopped(
                net, images, sample_ids, cfg, early, resume_path=resume, fingerprint=fingerprint
            )
        else:
            history = train_mim(net, images, cfg, resume_path=resume, fingerprint=fingerprint)
    info |= {
        "seed": cfg.seed,
        # bf16 autocast moves the weights (within bench/README.md's tolerances): recorded.
        "precision": resolve_precision(resolve_device(cfg.device), cfg.precision),
        "num_train_images": len(ids),
        "manifest_sha256": read_metadata(manifest)["manifest_sha256"],
    }
    save_trained(net, history, _sidecar_order(info), weights, train_log)


def _fresh(spec: dict) -> MIMModel:
    from mimia.models import ModelSpec, build_model

    return build_model(ModelSpec.from_dict(spec))


def _adapt(target, shadow, images, cfg, ids, resume, info) -> tuple[MIMModel, list[dict]]:
    """The ``adapted`` decoder: only decoder parameters receive gradients; the encoder (and
    SimMIM's mask token, part of what the target released) stays bit-identical."""
    from mimia.models.checkpoint import load_model
    from mimia.models.scoring import attach_decoder
    from mimia.provenance import file_sha256

    target_sha = file_sha256(target)
    info["target_sha256"] = target_sha
    fingerprint = join_fingerprint(target_sha, file_sha256(shadow), cfg.fingerprint(), len(ids))
    model = attach_decoder(load_model(target), load_model(shadow))
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.decoder.parameters():
        p.requires_grad_(True)
    history = train_mim(
        model,
        images,
        cfg,
        resume_path=resume,
        fingerprint=fingerprint,
        trainable=[(f"decoder.{n}", p) for n, p in model.decoder.named_parameters()],
    )
    return model, history


_SIDECAR_KEYS = (
    "model",
    "train_config",
    "adapt_config",
    "seed",
    "precision",
    "num_train_images",
    "manifest_sha256",
    "target_sha256",
    "decoder_released",
    "dp",
    "early_stopping",
)


def _sidecar_order(info: dict) -> dict:
    """The sidecar's keys in the order they have always had."""
    return {k: info[k] for k in _SIDECAR_KEYS if k in info}


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
