"""Downstream utility of a frozen encoder: linear-probe and k-NN accuracy, and the masked
reconstruction error on held-out images.

The probes train and test on labelled images outside every role of the split (on digits: the
images the split did not draw), so neither the audited members and non-members nor the
adversary's images are used, and an image that is a pixel copy of a role image is left out.
The pool is split, seeded and stratified by label, into the probes' training and test halves.
Features are the encoder's output with every patch visible: the cls token, or the mean of the
patch tokens. The same probes on a randomly initialised encoder of the same architecture are
the reference a pre-trained encoder should beat.

The probes can miss what MIM pre-training teaches (on 16 x 16 digits a random encoder probes
as well as a trained one), so the pre-training objective itself is reported too: the target's
masked reconstruction error on every pool image (none of which any model trained on), under
seeded masks, with a bootstrap CI over images, next to the same error of the random-init model.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import polars as pl
    import torch

    from mimia.data.sources import ImageSource
    from mimia.models.base import MIMModel

POOLINGS = ("cls", "mean")


# -- data ---------------------------------------------------------------------------------------
def utility_pool(
    manifest: pl.DataFrame, source: ImageSource, img_size: int, max_images: int, seed: int
) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, int]]:
    """Labelled images outside the manifest's roles: ``(keys, labels, uint8 [N, H, W, 3], counts)``.

    At most ``max_images`` (a seeded sample of the candidates, in source order); images whose
    pixels equal a role image's, or an earlier pool image's, are left out.
    """
    from mimia.data.sources import pixel_sha256, resize

    if source.labels is None:
        raise ValueError(f"dataset {source.name!r} has no labels: the utility stage needs them")
    in_roles = set(manifest["key"].to_list())
    role_hashes = set(manifest["content_sha256"].to_list())
    outside = [i for i, key in enumerate(source.keys) if key not in in_roles]
    candidates = outside
    if len(candidates) > max_images:
        picked = np.random.default_rng(seed).choice(len(candidates), max_images, replace=False)
        candidates = [candidates[i] for i in np.sort(picked)]
    keys, labels, images, seen = [], [], [], set()
    copies = 0
    for i in candidates:
        pixels = source.native(i)
        digest = pixel_sha256(pixels)
        if digest in role_hashes or digest in seen:
            copies += 1
            continue
        seen.add(digest)
        keys.append(source.keys[i])
        labels.append(int(source.labels[i]))
        images.append(resize(pixels, img_size))
    counts = {
        "source_images": len(source),
        "outside_roles": len(outside),
        "sampled": len(candidates),
        "left_out_as_copies": copies,
        "pool": len(keys),
    }
    if len(keys) < 4:
        raise ValueError(
            f"the utility stage needs labelled images outside the split's roles; dataset "
            f"{source.name!r} has {len(keys)} ({counts}). Shrink the split or set utility.enabled "
            f"false"
        )
    return keys, np.asarray(labels, dtype=np.int64), np.stack(images), counts


def split_pool(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, bool]:
    """Boolean ``is_test`` per image, stratified by label when every class has two images."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    _, counts = np.unique(labels, return_counts=True)
    stratified = bool(counts.min() >= 2)
    _, test = train_test_split(
        index,
        test_size=test_fraction,
        random_state=seed,
        stratify=labels if stratified else None,
    )
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test] = True
    return is_test, stratified


# -- features and probes ------------------------------------------------------------------------
def encoder_features(
    model: MIMModel, images: torch.Tensor, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """Frozen-encoder features of uint8 ``images [N, C, H, W]``, every patch visible:
    ``{"cls": [N, D], "mean": [N, D]}`` (cls token; mean of the patch tokens)."""
    from mimia.extract import encoder_tokens

    model.eval()
    out = {p: [] for p in POOLINGS}
    for start in range(0, len(images), batch_size):
        tokens = encoder_tokens(model, images[start : start + batch_size])
        out["cls"].append(tokens[:, 0].cpu().numpy())
        out["mean"].append(tokens[:, 1:].mean(dim=1).cpu().numpy())
    return {p: np.concatenate(v).astype(np.float64) for p, v in out.items()}


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int) -> np.ndarray:
    """Majority label of the ``k`` nearest training features by cosine distance (ties between
    labels go to the smallest label, as scikit-learn's ``KNeighborsClassifier``)."""
    if not 1 <= k <= len(train_x):
        raise ValueError(f"k-NN needs 1 <= k <= {len(train_x)} training images, got k={k}")

    def unit(x):
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(norms == 0, 1.0, norms)

    similarity = unit(test_x) @ unit(train_x).T
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    classes, codes = np.unique(train_y, return_inverse=True)
    votes = np.zeros((len(test_x), len(classes)), dtype=np.int64)
    np.add.at(votes, (np.repeat(np.arange(len(test_x)), k), codes[nearest].ravel()), 1)
    return classes[np.argmax(votes, axis=1)]


def linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, c: float, max_iter: int
) -> np.ndarray:
    """Standardised features, multinomial logistic regression (lbfgs, deterministic)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    return probe.fit(train_x, train_y).predict(test_x)


def probe_accuracies(
    features: dict[str, np.ndarray], labels: np.ndarray, is_test: np.ndarray, cfg: dict
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Test accuracy of both probes for every pooling, and the headline pooling's predictions."""
    train, test = ~is_test, is_test
    results, predictions = {}, {}
    for pooling, x in features.items():
        lin = linear_probe(x[train], labels[train], x[test], cfg["C"], cfg["max_iter"])
        knn = knn_predict(x[train], labels[train], x[test], cfg["k"])
        results[pooling] = {
            "linear_probe": float((lin == labels[test]).mean()),
            "knn": float((knn == labels[test]).mean()),
        }
        if pooling == cfg["pooling"]:
            predictions = {"linear_probe": lin, "knn": knn}
    return results, predictions


def heldout_errors(
    model: MIMModel,
    images: torch.Tensor,
    keys: list[str],
    mask_ratio: float,
    num_masks: int,
    seed: int,
    batch_size: int = 256,
) -> np.ndarray:
    """Per-image masked reconstruction error (the recipe's loss over masked patches, mean over
    ``num_masks`` masks keyed by ``seed`` and the image's key, as extraction draws them)."""
    from mimia.models.scoring import score_batch

    model.eval()
    errors = []
    for start in range(0, len(images), batch_size):
        stop = start + batch_size
        out = score_batch(model, images[start:stop], keys[start:stop], seed, mask_ratio, num_masks)
        errors.append(out["error"].double().mean(dim=1).numpy())
    return np.concatenate(errors)


# -- the stage ----------------------------------------------------------------------------------
def utility_stage(
    *,
    checkpoint: str | os.PathLike,
    manifest: str | os.PathLike,
    record: str | os.PathLike,
    split: str | os.PathLike,
    dataset: dict,
    utility: dict,
    seed: int,
    experiment: str = "",
    batch_size: int = 256,
) -> dict:
    """Linear-probe and k-NN accuracy of ``checkpoint``'s frozen encoder, and of a random-init
    encoder of the same architecture; writes the ``record`` (JSON) and the ``split`` (Parquet:
    each pool image's key, label, half and the headline probes' predictions)."""
    import polars as pl
    import torch

    from mimia.data.sources import load_source
    from mimia.metrics import clopper_pearson
    from mimia.models import build_model
    from mimia.models.checkpoint import file_sha256, load_model
    from mimia.provenance import provenance, read_metadata, write_parquet
    from mimia.storage import write_json

    rows = pl.read_parquet(manifest)
    model = load_model(checkpoint)
    keys, labels, pixels, counts = utility_pool(
        rows, load_source(dataset), dataset["img_size"], utility["max_images"], seed
    )
    is_test, stratified = split_pool(labels, utility["test_fraction"], seed)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    results, predictions = probe_accuracies(
        encoder_features(model, images, batch_size), labels, is_test, utility
    )
    torch.manual_seed(seed)
    random_init = build_model(model.spec)
    baseline, _ = probe_accuracies(
        encoder_features(random_init, images, batch_size), labels, is_test, utility
    )
    reconstruction = _heldout_reconstruction(
        checkpoint, model, random_init, images, keys, utility, seed, batch_size
    )
    n_test = int(is_test.sum())
    headline = results[utility["pooling"]]
    out = {
        "experiment": experiment,
        "checkpoint_sha256": file_sha256(checkpoint),
        "manifest_sha256": read_metadata(manifest)["manifest_sha256"],
        "seed": seed,
        "settings": utility,
        "pool": counts,
        "n_train": int((~is_test).sum()),
        "n_test": n_test,
        "stratified": stratified,
        "classes": len(np.unique(labels)),
        "chance_accuracy": float(np.bincount(labels[is_test]).max() / n_test),
    }
    for probe in ("linear_probe", "knn"):
        correct = round(headline[probe] * n_test)
        low, high = clopper_pearson(correct, n_test)
        out |= {
            f"{probe}_accuracy": headline[probe],
            f"{probe}_accuracy_ci_low": float(low),
            f"{probe}_accuracy_ci_high": float(high),
            f"random_init_{probe}_accuracy": baseline[utility["pooling"]][probe],
        }
    out |= reconstruction
    out |= {"by_pooling": results, "random_init_by_pooling": baseline}
    meta = provenance(
        seed=seed,
        manifest_sha256=out["manifest_sha256"],
        checkpoint_sha256=out["checkpoint_sha256"],
    )
    test = is_test
    table = pl.DataFrame(
        {
            "key": keys,
            "label": labels,
            "split": np.where(test, "test", "train"),
            "linear_probe_prediction": _on_test(predictions["linear_probe"], test),
            "knn_prediction": _on_test(predictions["knn"], test),
        },
        schema_overrides={"linear_probe_prediction": pl.Int64, "knn_prediction": pl.Int64},
    )
    write_parquet(table, split, meta)
    write_json(record, out)
    return out


def _heldout_reconstruction(
    checkpoint, model, random_init, images, keys, utility: dict, seed: int, batch_size: int
) -> dict:
    """The ``heldout_masked_error*`` fields of the record (null, with the reason, when the
    checkpoint has no decoder of its own: an imported encoder's decoder is untrained)."""
    from mimia.metrics import bootstrap_mean
    from mimia.models.checkpoint import read_sidecar

    fields = {
        "heldout_images": len(keys),
        "heldout_mask_ratio": utility["mask_ratio"],
        "heldout_num_masks": utility["num_masks"],
    }
    if not read_sidecar(checkpoint)["info"].get("decoder_released", False):
        return fields | {
            "heldout_masked_error": None,
            "heldout_masked_error_note": "the checkpoint has no trained decoder of its own",
        }
    args = (images, keys, utility["mask_ratio"], utility["num_masks"], seed, batch_size)
    errors = heldout_errors(model, *args)
    mean, low, high = bootstrap_mean(errors, utility["n_bootstrap"], seed)
    return fields | {
        "heldout_masked_error": mean,
        "heldout_masked_error_ci_low": low,
        "heldout_masked_error_ci_high": high,
        "random_init_heldout_masked_error": float(heldout_errors(random_init, *args).mean()),
    }


def _on_test(predicted: np.ndarray, is_test: np.ndarray) -> list[int | None]:
    values = iter(predicted.tolist())
    return [next(values) if t else None for t in is_test]
