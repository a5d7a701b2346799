"""Utility of a frozen encoder: the pool outside the roles, the split, the k-NN against
scikit-learn's, and both probes on real digits with a trained and a random-init encoder."""

import json

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from mimia.data.prepare import write_manifest
from mimia.data.sources import load_source
from mimia.masking import deterministic_masks
from mimia.models import build_model
from mimia.models.checkpoint import save_model
from mimia.training import TrainConfig, train_mim
from mimia.utility import (
    encoder_features,
    knn_predict,
    split_pool,
    utility_pool,
    utility_stage,
)

SPLIT = {
    "target_member": 400,
    "target_nonmember": 400,
    "shadow_member": 400,
    "shadow_nonmember": 400,
    "dedupe": True,
    "assignment": None,
    "shadow_classes": None,
}
DATASET = {"name": "digits", "img_size": 16, "path": None, "urls": None, "split": "train"}
UTILITY = {"pooling": "cls", "test_fraction": 0.5, "max_images": 10000, "k": 5, "C": 1.0}
UTILITY |= {"max_iter": 2000, "enabled": True, "mask_ratio": 0.75, "num_masks": 3}
UTILITY |= {"n_bootstrap": 200}


@pytest.fixture(scope="module")
def digits_manifest(tmp_path_factory):
    path = tmp_path_factory.mktemp("utility") / "manifest.parquet"
    write_manifest(dataset=DATASET, split=SPLIT, seed=0, manifest=path)
    return path


@pytest.mark.parametrize("k", [1, 4, 7])
def test_knn_equals_scikit_learns_cosine_knn(k):
    rng = np.random.default_rng(k)
    train_x, test_x = rng.normal(size=(120, 16)), rng.normal(size=(80, 16))
    train_y = rng.integers(0, 5, size=120)
    ours = knn_predict(train_x, train_y, test_x, k)
    theirs = (
        KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
        .fit(train_x, train_y)
        .predict(test_x)
    )
    np.testing.assert_array_equal(ours, theirs)
    with pytest.raises(ValueError, match="k-NN needs"):
        knn_predict(train_x, train_y, test_x, 121)


def test_the_pool_is_the_digits_outside_every_role(digits_manifest):
    rows = pl.read_parquet(digits_manifest)
    source = load_source(DATASET)
    keys, labels, images, counts = utility_pool(rows, source, 16, 10000, seed=0)
    assert not set(keys) & set(rows["key"])
    assert counts["source_images"] == 1797 and counts["outside_roles"] == 1797 - rows.height
    assert len(keys) == counts["pool"] == counts["outside_roles"] - counts["left_out_as_copies"]
    assert images.shape == (len(keys), 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, source.labels[[int(k) for k in keys]])
    # An outside image whose pixels equal a role image's is a member in disguise: left out.
    copy = rows.with_columns(
        pl.when(pl.col("sample_id") == rows["sample_id"][0])
        .then(pl.lit(source.content_sha256(int(keys[0]))))
        .otherwise(pl.col("content_sha256"))
        .alias("content_sha256")
    )
    kept, _, _, counted = utility_pool(copy, source, 16, 10000, seed=0)
    assert keys[0] not in kept and counted["left_out_as_copies"] == counts["left_out_as_copies"] + 1
    sampled, _, _, _ = utility_pool(rows, source, 16, 50, seed=0)
    assert len(sampled) <= 50 and set(sampled) <= set(keys)


def test_the_split_is_seeded_and_stratified():
    labels = np.repeat(np.arange(10), 20)
    is_test, stratified = split_pool(labels, 0.5, seed=3)
    assert stratified and is_test.sum() == 100
    assert (np.bincount(labels[is_test]) == 10).all()
    np.testing.assert_array_equal(is_test, split_pool(labels, 0.5, seed=3)[0])
    assert not np.array_equal(is_test, split_pool(labels, 0.5, seed=4)[0])
    _, stratified = split_pool(np.array([0, 1, 1, 1, 2, 2]), 0.5, seed=0)
    assert not stratified  # class 0 has one image


def test_trained_and_random_encoders_on_real_digits(digits_manifest, tmp_path, tiny_spec):
    from mimia.data.shards import write_tar_shard

    rows = pl.read_parquet(digits_manifest)
    members = rows.filter(pl.col("role") == "target_member")
    source = load_source(DATASET)
    write_tar_shard(members, source, 16, tmp_path / "members.tar")
    from mimia.data.shards import load_images

    _, images = load_images([tmp_path / "members.tar"])
    torch.manual_seed(0)
    model = build_model(tiny_spec)
    cfg = {"epochs": 30, "batch_size": 25, "warmup_epochs": 3, "blr": 1e-2}
    train_mim(model, images, TrainConfig.from_section(cfg, seed=0))
    weights = tmp_path / "model.safetensors"
    save_model(model, weights, {"model": "target", "decoder_released": True})

    record = utility_stage(
        checkpoint=weights,
        manifest=digits_manifest,
        record=tmp_path / "utility.json",
        split=tmp_path / "utility.parquet",
        dataset=DATASET,
        utility=UTILITY,
        seed=0,
        experiment="digits",
    )
    assert record == json.loads((tmp_path / "utility.json").read_text())
    split = pl.read_parquet(tmp_path / "utility.parquet")
    n_test = record["n_test"]
    assert record["n_train"] + n_test == split.height == record["pool"]["pool"]
    assert split.filter(pl.col("split") == "test").height == n_test
    assert not set(split["key"]) & set(rows["key"])
    # The headline accuracies are the recorded predictions' accuracies.
    test = split.filter(pl.col("split") == "test")
    for probe in ("linear_probe", "knn"):
        acc = (test[f"{probe}_prediction"] == test["label"]).mean()
        assert record[f"{probe}_accuracy"] == pytest.approx(acc)
        assert record[f"{probe}_accuracy_ci_low"] < acc < record[f"{probe}_accuracy_ci_high"]
    # Ten balanced classes: chance is about 0.1; both encoders are far above it, and the
    # Clopper–Pearson interval of the trained one excludes chance.
    assert record["classes"] == 10 and record["chance_accuracy"] < 0.15
    assert record["linear_probe_accuracy_ci_low"] > 0.3
    assert record["knn_accuracy_ci_low"] > 0.3
    assert record["random_init_linear_probe_accuracy"] > 0.3
    for pooling in ("cls", "mean"):
        assert set(record["by_pooling"][pooling]) == {"linear_probe", "knn"}

    # The held-out masked error is the model's own training loss (its forward) under the
    # keyed masks, averaged over masks and every pool image; training lowered it well below
    # the random-init model's.
    pool = torch.from_numpy(
        np.stack([source.image(int(k), 16) for k in split["key"].to_list()])
    ).permute(0, 3, 1, 2)
    masks = deterministic_masks(0, split["key"].to_list(), 0.75, range(3), tiny_spec.grid_size)
    with torch.no_grad():
        losses = [model(pool.float() / 255, masks[:, k])[0] for k in range(3)]
    expected = torch.stack(losses, dim=1).double().mean().item()
    assert record["heldout_images"] == split.height
    assert record["heldout_masked_error"] == pytest.approx(expected, rel=1e-5)
    low, high = record["heldout_masked_error_ci_low"], record["heldout_masked_error_ci_high"]
    assert low < expected < high
    assert record["heldout_masked_error"] < 0.8 * record["random_init_heldout_masked_error"]

    # The k-NN on the trained encoder's features is scikit-learn's.
    keys = split["key"].to_list()
    pixels = np.stack([source.image(int(k), 16) for k in keys])
    feats = encoder_features(model, torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous())
    is_test = (split["split"] == "test").to_numpy()
    labels = split["label"].to_numpy()
    for pooling, x in feats.items():
        theirs = (
            KNeighborsClassifier(n_neighbors=5, metric="cosine", algorithm="brute")
            .fit(x[~is_test], labels[~is_test])
            .predict(x[is_test])
        )
        assert record["by_pooling"][pooling]["knn"] == pytest.approx(
            (theirs == labels[is_test]).mean()
        )
