"""One entry point per workflow rule, named like the rule.

Each function takes keyword-only arguments named after its rule's ``input``, ``output`` and
``params`` keys (plus ``runtime``: the experiment's runtime section, read by the job itself
so that it never becomes a rule param), and calls the domain modules. Heavy imports happen
inside the functions: importing this module costs nothing, and the rule scripts redirect
their log before any of it runs.
"""

from __future__ import annotations

import errno
import inspect
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mimia.layout import REFERENCE_DECODER, SHADOW_ROLES, TARGET, shadow_index

PathLike = str | Path


# -- data ---------------------------------------------------------------------------------------
def manifest(
    *,
    manifest: PathLike,
    dataset: dict,
    split: dict,
    seed: int,
    source_fingerprint: str,
    assignment: Sequence[PathLike] = (),
) -> None:
    """The role split of the dataset (``source_fingerprint``: the source listing the DAG saw;
    a source that changed since then is refused rather than split)."""
    from mimia.data.prepare import write_manifest

    _check_source_unchanged(dataset, source_fingerprint)
    write_manifest(dataset=dataset, split=split, seed=seed, manifest=manifest)


def _check_source_unchanged(dataset: dict, source_fingerprint: str) -> None:
    """Refuse a source whose listing differs from the one the DAG was built on."""
    from mimia.data.sources import source_fingerprint as fingerprint

    now = fingerprint(dataset)
    if now != source_fingerprint:
        raise RuntimeError(
            f"dataset {dataset.get('path') or dataset['name']} changed while the workflow ran "
            f"(listing {source_fingerprint[:12]} when the DAG was built, {now[:12]} now); "
            f"run snakemake again"
        )


def membership(**kwargs) -> None:
    """Which adversary images train one shadow model: one file per model, so adding a
    reference model leaves the others' files, and the models trained on them, untouched (see
    :func:`mimia.data.prepare.write_membership`, whose keyword arguments are the rule's)."""
    from mimia.data.prepare import write_membership

    write_membership(**kwargs)


def shard(**kwargs) -> None:
    """One webdataset shard of one role (:func:`mimia.data.prepare.write_shard`)."""
    from mimia.data.prepare import write_shard

    write_shard(**kwargs)


# -- models -------------------------------------------------------------------------------------
def _train_config(train: dict, seed: int, runtime: dict):
    from mimia.pretrain import TrainConfig

    return TrainConfig.from_section(
        train, seed=seed, device=runtime["device"], compile=runtime["compile"]
    )


def pretrain(
    *,
    manifest: PathLike,
    shards: Sequence[PathLike],
    weights: PathLike,
    sidecar: PathLike,
    train_log: PathLike,
    model: str,
    spec: dict,
    train: dict,
    seed: int,
    runtime: dict,
    membership: PathLike | None = None,
) -> None:
    """Pre-train the target (on ``target_member``) or shadow model ``model`` (on its
    membership file's IN images); ``train.dp`` / ``train.early_stopping`` select DP-SGD or
    early stopping (:mod:`mimia.defenses`)."""
    import polars as pl
    import torch

    from mimia.data.shards import load_images
    from mimia.defenses import split_defenses
    from mimia.models import ModelSpec, build_model
    from mimia.pretrain import resume_path_for, save_trained, train_mim
    from mimia.provenance import read_metadata

    rows = pl.read_parquet(manifest)
    if model == TARGET:
        ids = set(rows.filter(pl.col("role") == "target_member")["sample_id"])
        offset = 0
    else:
        table = pl.read_parquet(membership)
        ids = set(table.filter(pl.col("is_in"))["sample_id"])
        offset = 1 + shadow_index(model)
    if not ids:
        raise ValueError(f"model {model!r} has no training images")
    sample_ids, images = load_images(shards, ids)
    recipe, dp, early = split_defenses(train)
    cfg = _train_config(recipe, seed + offset, runtime)
    torch.manual_seed(cfg.seed)
    net = build_model(ModelSpec.from_dict(spec))
    fingerprint = f"{net.spec.to_dict()}|{cfg.fingerprint()}|{sorted(ids)}"
    resume = resume_path_for(weights)
    info = {
        "model": model,
        "train_config": train,
        "seed": cfg.seed,
        "num_train_images": len(ids),
        "manifest_sha256": read_metadata(manifest)["manifest_sha256"],
        "decoder_released": True,
    }
    if dp is not None:
        from mimia.config import canonical
        from mimia.defenses import train_dp

        history, info["dp"] = train_dp(
            net,
            images,
            cfg,
            dp,
            resume_path=resume,
            fingerprint=f"dp|{canonical(dp)}|{fingerprint}",
        )
    elif early is not None:
        from mimia.defenses import train_early_stopped

        history, info["early_stopping"] = train_early_stopped(
            net, images, sample_ids, cfg, early, resume_path=resume, fingerprint=fingerprint
        )
    else:
        history = train_mim(net, images, cfg, resume_path=resume, fingerprint=fingerprint)
    save_trained(net, history, info, weights, train_log)
    _same_paths(weights, sidecar)


def import_target(
    *,
    checkpoint: PathLike,
    weights: PathLike,
    sidecar: PathLike,
    format: str,
    spec: dict,
    needs_decoder: bool,
) -> None:
    """Bring released target weights into mimia's format (checked against ``spec``)."""
    from mimia.models import ModelSpec
    from mimia.models.checkpoint import import_checkpoint, save_model

    # A released encoder keeps its own normalisation, and in the encoder-only modes its
    # decoder is replaced, so those fields need not match the model section.
    ignore = ["mean", "std"] if format == "mimia" else []
    if not needs_decoder:
        ignore += [f for f in spec if f.startswith("decoder_")]
    model, info = import_checkpoint(checkpoint, format, ModelSpec.from_dict(spec), ignore=ignore)
    if needs_decoder and not info["decoder_released"]:
        raise ValueError(
            f"target checkpoint {checkpoint} has no decoder, so decoder mode 'released' cannot "
            f"run; use decoder: [shadow, adapted]"
        )
    save_model(
        model,
        weights,
        {"model": TARGET, "imported": info, "decoder_released": info["decoder_released"]},
    )
    _same_paths(weights, sidecar)


def adapt_decoder(
    *,
    target: PathLike,
    shadow: PathLike,
    manifest: PathLike,
    shards: Sequence[PathLike],
    weights: PathLike,
    sidecar: PathLike,
    train_log: PathLike,
    train: dict,
    seed: int,
    runtime: dict,
) -> None:
    """Fit the ``adapted`` decoder: shadow0's decoder on the frozen target encoder, trained on
    the adversary's shards only (shadow roles)."""
    import polars as pl

    from mimia.data.shards import load_images
    from mimia.decoders import adapt_decoder as adapt
    from mimia.models.checkpoint import load_model
    from mimia.pretrain import resume_path_for, save_trained
    from mimia.provenance import file_sha256, read_metadata

    rows = pl.read_parquet(manifest)
    ids = set(rows.filter(pl.col("role").is_in(SHADOW_ROLES))["sample_id"])
    _, images = load_images(shards, ids)
    cfg = _train_config(train, seed + 10_000, runtime)
    target_sha = file_sha256(target)
    fingerprint = f"{target_sha}|{file_sha256(shadow)}|{cfg.fingerprint()}|{len(ids)}"
    model, history = adapt(
        load_model(target), load_model(shadow), images, cfg, resume_path_for(weights), fingerprint
    )
    info = {
        "model": "target-adapted",
        "adapt_config": train,
        "seed": cfg.seed,
        "num_train_images": len(ids),
        "manifest_sha256": read_metadata(manifest)["manifest_sha256"],
        "target_sha256": target_sha,
        "decoder_released": False,
    }
    save_trained(model, history, info, weights, train_log)
    _same_paths(weights, sidecar)


def _same_paths(weights: PathLike, sidecar: PathLike) -> None:
    from mimia.models.checkpoint import sidecar_path

    if Path(sidecar) != sidecar_path(weights):
        raise ValueError(
            f"the rule names sidecar {sidecar}, the checkpoint writes it beside {weights}"
        )


# -- errors and embeddings ----------------------------------------------------------------------
def _checkpoints(checkpoint: PathLike, shadow_decoder: PathLike | None) -> dict[str, str]:
    found = {"model": str(checkpoint)}
    if shadow_decoder:
        found["shadow"] = str(shadow_decoder)
    return found


def extract(
    *,
    checkpoint: PathLike,
    shard: PathLike,
    manifest: PathLike,
    errors: PathLike,
    model: str,
    decoder: str,
    seed: int,
    mask_ratios: Sequence[float],
    num_masks: int,
    runtime: dict,
    shadow_decoder: PathLike | None = None,
) -> None:
    """Reconstruction errors of one shard under the K masks of every mask ratio, for the
    scoring model (``checkpoint``'s encoder with the decoder ``decoder`` names)."""
    from mimia.devices import resolve_device
    from mimia.extract import extract_shard, scoring_model
    from mimia.provenance import file_sha256, provenance, read_metadata

    if model != TARGET and decoder != REFERENCE_DECODER:
        raise ValueError(f"shadow models are scored with their own decoder, not {decoder!r}")
    checkpoints = _checkpoints(checkpoint, shadow_decoder)
    device = resolve_device(runtime["device"])
    scorer = scoring_model(decoder, checkpoints, device=str(device))
    meta = provenance(
        seed=seed,
        manifest_sha256=read_metadata(manifest)["manifest_sha256"],
        shard_file=str(shard),
        shard_sha256=file_sha256(shard),
        checkpoint_files=checkpoints,
        checkpoint_sha256={k: file_sha256(v) for k, v in checkpoints.items()},
        model=model,
        decoder=decoder,
        mask_ratios=list(mask_ratios),
        num_masks=num_masks,
    )
    extract_shard(
        scorer,
        shard,
        errors,
        model_name=model,
        decoder=decoder,
        seed=seed,
        mask_ratios=mask_ratios,
        num_masks=num_masks,
        batch_size=runtime["batch_size"],
        num_workers=runtime["num_workers"],
        metadata=meta,
    )


def collect_errors(*, tables: Sequence[PathLike], errors: PathLike) -> None:
    from mimia.extract import collect_errors as collect

    collect(tables, errors)


def embed(
    *,
    checkpoint: PathLike,
    shards: Sequence[PathLike],
    manifest: PathLike,
    embeddings: PathLike,
    model: str,
    seed: int,
    num_views: int,
    runtime: dict,
) -> None:
    """EncoderMI features: similarities of the encoder's embeddings of augmented views."""
    from mimia.extract import embed_shards
    from mimia.models.checkpoint import load_model
    from mimia.provenance import file_sha256, provenance, read_metadata, write_parquet

    table = embed_shards(
        load_model(checkpoint), shards, model, seed, num_views, runtime["batch_size"]
    )
    meta = provenance(
        seed=seed,
        manifest_sha256=read_metadata(manifest)["manifest_sha256"],
        checkpoint_files={"model": str(checkpoint)},
        checkpoint_sha256={"model": file_sha256(checkpoint)},
        model=model,
        num_views=num_views,
    )
    write_parquet(table, embeddings, meta)


# -- attacks ------------------------------------------------------------------------------------
def attack(**kwargs) -> None:
    """Fit one attack on the adversary's data and score the target under one decoder: see
    :func:`mimia.attacks.stage.attack_stage`, whose keyword arguments are the rule's."""
    from mimia.attacks.stage import attack_stage

    attack_stage(**kwargs)


# -- report -------------------------------------------------------------------------------------
def reconstructions(
    *,
    checkpoint: PathLike,
    manifest: PathLike,
    members: Sequence[PathLike],
    nonmembers: Sequence[PathLike],
    figure: PathLike,
    decoder: str,
    seed: int,
    mask_ratio: float,
    grid_samples: int,
    shadow_decoder: PathLike | None = None,
) -> None:
    """The reconstruction grid: members and non-members drawn across classes with the seed."""
    from mimia.extract import scoring_model
    from mimia.report.figures import reconstruction_figure

    model = scoring_model(decoder, _checkpoints(checkpoint, shadow_decoder))
    reconstruction_figure(
        model, manifest, members, nonmembers, grid_samples, seed, mask_ratio, figure
    )


def experiment_metrics(
    *,
    metrics: Sequence[PathLike],
    record: PathLike,
    table: PathLike,
    experiment: str,
    seed: int,
    ablation: dict | None,
) -> None:
    from mimia.report.tables import experiment_metrics as gather

    gather(experiment, seed, ablation, metrics, record, table)


def figures(
    *,
    errors: PathLike,
    manifest: PathLike,
    metrics: PathLike,
    rocs: Sequence[PathLike],
    roc: PathLike,
    histograms: PathLike,
    ratios: PathLike,
    experiment: str,
    seed: int,
) -> None:
    from mimia.report.figures import experiment_figures

    experiment_figures(
        experiment, errors, manifest, metrics, rocs, roc, histograms, ratios, seed=seed
    )


def summary(
    *, tables: Sequence[PathLike], parquet: PathLike, csv: PathLike, markdown: PathLike
) -> None:
    from mimia.report.tables import summary as gather

    gather(tables, parquet, csv, markdown)


def ablation_plot(*, summary: PathLike, figure: PathLike, ablation: str) -> None:
    import polars as pl

    from mimia.report.figures import ablation_figure

    ablation_figure(pl.read_parquet(summary), ablation, figure)


# -- defenses and utility -----------------------------------------------------------------------
def utility(
    *,
    checkpoint: PathLike,
    manifest: PathLike,
    record: PathLike,
    split: PathLike,
    dataset: dict,
    utility: dict,
    seed: int,
    source_fingerprint: str,
    experiment: str,
    runtime: dict,
) -> None:
    """Linear-probe and k-NN accuracy of the target's frozen encoder on labelled images
    outside every role (``source_fingerprint`` as in :func:`manifest`)."""
    from mimia.utility import utility_stage

    _check_source_unchanged(dataset, source_fingerprint)
    utility_stage(
        checkpoint=checkpoint,
        manifest=manifest,
        record=record,
        split=split,
        dataset=dataset,
        utility=utility,
        seed=seed,
        experiment=experiment,
        batch_size=runtime["batch_size"],
    )


def privacy_audit(
    *,
    scores: Sequence[PathLike],
    sidecar: PathLike,
    table: PathLike,
    record: PathLike,
    audit: dict,
    experiment: str,
) -> None:
    """The empirical epsilon lower bound of every attack, next to the accountant's epsilon."""
    from mimia.report.tables import privacy_audit as audit_attacks

    audit_attacks(experiment, scores, sidecar, audit, table, record)


def privacy_utility(
    *,
    metrics: Sequence[PathLike],
    privacy: Sequence[PathLike],
    utility: Sequence[PathLike],
    figure: PathLike,
    parquet: PathLike,
    csv: PathLike,
    markdown: PathLike,
    settings: dict,
) -> None:
    """The privacy–utility table (``summary_privacy_utility.*``) and figure over experiments."""
    from mimia.report.figures import privacy_utility_figure
    from mimia.report.tables import privacy_utility_table

    table = privacy_utility_table(metrics, privacy, utility, settings, parquet, csv, markdown)
    privacy_utility_figure(table, figure)


# -- running a stage from a rule ----------------------------------------------------------------
def _named(items) -> dict[str, Any]:
    return {k: v for k, v in items._allitems() if k is not None}


def _runtime(smk) -> dict:
    from mimia.config import resolve_experiments

    return resolve_experiments(smk.config)[smk.wildcards.experiment]["runtime"]


def run_script(smk) -> None:
    """Run the stage named like ``smk.rule`` with the rule's inputs, outputs and params.

    The log gets everything the stage prints, its traceback on failure and, at the end, the
    wall time (cached rules carry no ``benchmark:``, so this is where their timing lives).
    A full disk is reported as such, naming the file, also on the job's own stderr: the log
    itself may be what could not be written.
    """
    log = open(smk.log[0], "w", buffering=1)
    sys.stdout = sys.stderr = log
    threads = str(max(int(smk.threads), 1))
    os.environ.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    stage = globals()[smk.rule]
    kwargs = {**_named(smk.input), **_named(smk.output), **_named(smk.params)}
    if "runtime" in inspect.signature(stage).parameters:
        kwargs["runtime"] = _runtime(smk)
    start = time.perf_counter()
    try:
        if "torch" in sys.modules or smk.rule in _TORCH_RULES:
            import torch

            torch.set_num_threads(int(threads))
        stage(**kwargs)
    except BaseException as err:
        message = _failure(smk.rule, err)
        try:
            traceback.print_exc()
            print(message, flush=True)
        except OSError:
            pass
        print(message, file=sys.__stderr__, flush=True)
        raise SystemExit(1) from None
    print(f"{smk.rule} finished in {time.perf_counter() - start:.1f} s", flush=True)


_TORCH_RULES = {"pretrain", "import_target", "adapt_decoder", "extract", "embed", "reconstructions"}


def _failure(rule: str, err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" while writing {err.filename}" if err.filename else ""
        return f"rule {rule} failed: no space left on device{where} ({err})"
    return f"rule {rule} failed: {type(err).__name__}: {err}"
