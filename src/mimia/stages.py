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

from mimia.layout import OWN_DECODER, PAPER_SHADOW, TARGET

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
    """Pre-train the target or shadow model ``model`` (:func:`mimia.training.run`)."""
    from mimia.training import run

    run(
        model=model,
        manifest=manifest,
        shards=shards,
        weights=weights,
        train_log=train_log,
        train=train,
        seed=seed,
        runtime=runtime,
        spec=spec,
        membership=membership,
    )
    _same_paths(weights, sidecar)


def import_target(
    *,
    checkpoint: PathLike,
    weights: PathLike,
    sidecar: PathLike,
    format: str,
    spec: dict,
    needs_decoder: bool,
    stated: Sequence[str] | None = None,
    images: Sequence[PathLike] = (),
) -> None:
    """Bring released target weights into mimia's format (checked against ``spec``).

    ``stated``: for timm and mae checkpoints, the fields of ``spec`` the user wrote; a field
    the checkpoint does not record must be one of them. ``images``: shards whose first images
    test the stated heads and LayerNorm eps against the released decoder
    (:mod:`mimia.models.plausibility`); the outcome goes into the sidecar.
    """
    from mimia.models import ModelSpec
    from mimia.models.checkpoint import import_checkpoint, save_model
    from mimia.models.plausibility import check_import

    # A released encoder keeps its own normalisation, and in the encoder-only modes its
    # decoder is replaced, so those fields need not match the model section.
    ignore = ["mean", "std"] if format == "mimia" else []
    if not needs_decoder:
        ignore += [f for f in spec if f.startswith("decoder_")]
    options = {} if stated is None else {"stated": stated}
    model, info = import_checkpoint(
        checkpoint, format, ModelSpec.from_dict(spec), ignore=ignore, **options
    )
    if needs_decoder and not info["decoder_released"]:
        raise ValueError(
            f"target checkpoint {checkpoint} has no decoder, so decoder mode 'released' cannot "
            f"run; use decoder: [shadow, adapted]"
        )
    ids, pixels = _first_images(images) if images else ([], None)
    info["plausibility"] = check_import(
        model, info, pixels, ids, what=f"target checkpoint {checkpoint}"
    )
    save_model(
        model,
        weights,
        {"model": TARGET, "imported": info, "decoder_released": info["decoder_released"]},
    )
    _same_paths(weights, sidecar)


def _first_images(shards: Sequence[PathLike]):
    """Ids and pixels in [0, 1] of the first images the plausibility check takes, in shard
    order (reading no further: a shard may hold thousands)."""
    from itertools import islice

    import torch

    from mimia.data.shards import shard_dataset
    from mimia.models.plausibility import MAX_IMAGES

    items = list(islice(shard_dataset(shards), MAX_IMAGES))
    if not items:
        return [], None
    return [sid for sid, _, _ in items], torch.stack([img for _, img, _ in items]).float() / 255


def adapt_decoder(
    *,
    encoder: PathLike,
    shadow: PathLike,
    manifest: PathLike,
    shards: Sequence[PathLike],
    weights: PathLike,
    sidecar: PathLike,
    train_log: PathLike,
    model: str,
    train: dict,
    seed: int,
    runtime: dict,
) -> None:
    """Fit the ``adapted`` decoder ``model``: shadow0's decoder on the frozen ``encoder``
    (the target's, or a reference model's for the usage audit), trained on images that
    encoder's model never saw (:func:`mimia.training.run`)."""
    from mimia.training import run

    run(
        model=model,
        manifest=manifest,
        shards=shards,
        weights=weights,
        train_log=train_log,
        train=train,
        seed=seed,
        runtime=runtime,
        target=encoder,
        shadow=shadow,
    )
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
    from mimia.devices import resolve_device, resolve_precision
    from mimia.extract import extract_shard, scoring_model
    from mimia.provenance import file_sha256, provenance, read_metadata

    if model == PAPER_SHADOW and decoder != OWN_DECODER:
        # Its decoder is the one the other modes borrow: every mode of it is its own.
        raise ValueError(f"{PAPER_SHADOW} is scored with its own decoder, not {decoder!r}")
    checkpoints = _checkpoints(checkpoint, shadow_decoder)
    device = resolve_device(runtime["device"])
    precision = resolve_precision(device, runtime.get("precision", "auto"))
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
        precision=precision,
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
        precision=precision,
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
    """EncoderMI features: similarities of the encoder's embeddings of augmented views, on
    the runtime device (the device the rule reserves a GPU for)."""
    from mimia.devices import resolve_device
    from mimia.extract import embed_shards
    from mimia.models.checkpoint import load_model
    from mimia.provenance import file_sha256, provenance, read_metadata, write_parquet

    encoder = load_model(checkpoint, device=str(resolve_device(runtime["device"])))
    table = embed_shards(encoder, shards, model, seed, num_views, runtime["batch_size"])
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


def usage_collection(
    *,
    manifest: PathLike,
    table: PathLike,
    shard: PathLike,
    name: str,
    source: dict,
    img_size: int,
    seed: int,
    source_fingerprint: str,
) -> None:
    """A usage collection given as images, as one shard and its image table
    (:func:`mimia.data.collections.write_collection`); ``source_fingerprint`` reruns it when
    the images change, and a source that changed since the DAG was built is refused."""
    from mimia.data.collections import write_collection

    _check_source_unchanged(source, source_fingerprint)
    write_collection(
        name=name,
        source=source,
        manifest=manifest,
        img_size=img_size,
        table=table,
        shard=shard,
        seed=seed,
    )


def extract_collection(*, runtime: dict, **kwargs) -> None:
    """A model's reconstruction errors on a usage collection's shard (see :func:`extract`)."""
    extract(runtime=runtime, **kwargs)


def usage(**kwargs) -> None:
    """Dataset usage inference per (decoder, attack): see :func:`mimia.usage.usage_stage`,
    whose keyword arguments are the rule's."""
    from mimia.usage import usage_stage

    usage_stage(**kwargs)


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
    """The experiment's ``runtime`` section, and for a training rule its section's
    rerun-free keys (``checkpoint_every``): how the job runs, kept out of the rule params."""
    from mimia.config import RERUN_FREE_KEYS, model_pretrain, resolve_experiments

    exp = resolve_experiments(smk.config)[smk.wildcards.experiment]
    training = {
        "pretrain": lambda: model_pretrain(exp, smk.wildcards.model),
        "adapt_decoder": lambda: exp["adapt"],
    }.get(smk.rule)
    extra = {} if training is None else {k: training()[k] for k in RERUN_FREE_KEYS}
    return {**exp["runtime"], **extra}


def run_script(smk) -> None:
    """Run the stage named like ``smk.rule`` with the rule's inputs, outputs and params.

    Around the stage runs the hash chain (:mod:`mimia.provenance`): every input is hashed and
    refused if it is not what its producer recorded (a model also against the hash its
    sidecar recorded when it was written: one fetched from the between-workflow cache has no
    receipt here), and every output gets a receipt of its own hash, the inputs' hashes and the
    rule's ``code`` param (the hash of the stage's code).

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
    params = _named(smk.params)
    code = params.pop("code", None)
    kwargs = {**_named(smk.input), **_named(smk.output), **params}
    if "runtime" in inspect.signature(stage).parameters:
        kwargs["runtime"] = _runtime(smk)
    start = time.perf_counter()
    try:
        inputs = _checked_inputs(list(smk.input), smk.config["results"])
        outputs = [str(p) for p in smk.output]
        _begin(smk.rule, code, inputs, outputs)
        if "torch" in sys.modules or smk.rule in _TORCH_RULES:
            import torch

            torch.set_num_threads(int(threads))
        stage(**kwargs)
        _end(smk.rule, outputs, dict(smk.wildcards.items()))
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


def _checked_inputs(inputs: list[str], results: str) -> dict[str, str]:
    """SHA-256 of every input (a model's sidecar included), each checked against what its
    producer recorded; a model in the results folder must match its sidecar's hash."""
    from mimia.provenance import check_inputs
    from mimia.storage import seal

    for path in inputs:
        seal(path)
    models = [p for p in inputs if p.endswith(".safetensors")]
    if models:
        from mimia.models.checkpoint import check_weights, sidecar_path

        for path in models:
            inside = Path(os.path.abspath(path)).is_relative_to(os.path.abspath(results))
            check_weights(path, required=inside)
        inputs = inputs + [str(sidecar_path(p)) for p in models if sidecar_path(p).is_file()]
    return check_inputs(inputs)


def _begin(rule: str, code: str | None, inputs: dict[str, str], outputs: list[str]) -> None:
    from mimia.provenance import begin_job, receipt_path

    # A receipt outlives a failed rerun of its job only to be wrong about the file.
    for path in outputs:
        receipt_path(path).unlink(missing_ok=True)
    begin_job(rule, code, inputs)


def _end(rule: str, outputs: list[str], wildcards: dict[str, str]) -> None:
    from mimia.provenance import write_receipts

    write_receipts(outputs, rule, wildcards)


_TORCH_RULES = {
    "pretrain",
    "import_target",
    "adapt_decoder",
    "extract",
    "extract_collection",
    "embed",
    "reconstructions",
}


def _failure(rule: str, err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" while writing {err.filename}" if err.filename else ""
        return f"rule {rule} failed: no space left on device{where} ({err})"
    return f"rule {rule} failed: {type(err).__name__}: {err}"
