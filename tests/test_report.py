import json

import numpy as np
import polars as pl
import pytest

from mimia.metrics import bootstrap_mean, evaluate, roc_frame
from mimia.provenance import write_parquet
from mimia.report.figures import (
    ablation_figure,
    error_vs_mask_ratio,
    mask_ratio_stats,
    pick_across_classes,
    reconstruction_figure,
    roc_figure,
    target_errors,
)
from mimia.report.tables import experiment_metrics, markdown_table, summary


def _attack_outputs(tmp_path, decoder, attack, shift, seed):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(200, bool), np.zeros(200, bool)]
    scores = rng.normal(size=400) + shift * labels
    folder = tmp_path / "attacks" / decoder
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {"decoder": decoder, "attack": attack, **evaluate(labels, scores, n_bootstrap=100)}
    metrics |= {"manifest_sha256": "f" * 64, "mimia_version": "test"}
    (folder / f"{attack}.json").write_text(json.dumps(metrics))
    write_parquet(
        pl.DataFrame({"score": scores}),
        folder / f"{attack}.parquet",
        {"manifest_sha256": "f" * 64, "mimia_version": "test"},
    )
    write_parquet(roc_frame(labels, scores), folder / f"{attack}-roc.parquet", {})
    return folder / f"{attack}.json"


def test_experiment_table_summary_and_markdown(tmp_path):
    files = [
        _attack_outputs(tmp_path, d, a, s, i)
        for i, (d, a, s) in enumerate(
            [("shadow", "threshold", 0.5), ("shadow", "lira", 1.5), ("adapted", "threshold", 1.0)]
        )
    ]
    tables = []
    for name, ablation in (
        ("base", None),
        ("base__k-4", {"name": "k", "parameter": "extract.num_masks", "value": 4, "order": 0}),
    ):
        df = experiment_metrics(
            name, 3, ablation, files, tmp_path / f"{name}.json", tmp_path / f"{name}.parquet"
        )
        assert df.height == 3
        tables.append(tmp_path / f"{name}.parquet")
    info = json.loads((tmp_path / "base.json").read_text())
    assert info["seed"] == 3 and info["manifest_sha256"] == "f" * 64 and len(info["results"]) == 3
    out = summary(tables, tmp_path / "s.parquet", tmp_path / "s.csv", tmp_path / "s.md")
    assert out.height == 6
    assert out.filter(pl.col("experiment") == "base__k-4")["ablation_value"].to_list() == ["4"] * 3
    # A value per parameter (images per role x epochs) is labelled by its distinct values.
    steps = {
        "name": "steps",
        "parameter": ["split.target_member", "split.shadow_member", "pretrain.epochs"],
        "value": {"split.target_member": 125, "split.shadow_member": 125, "pretrain.epochs": 240},
        "order": 0,
    }
    line = experiment_metrics(
        "base__steps-125_240", 3, steps, files, tmp_path / "x.json", tmp_path / "x.parquet"
    ).row(0, named=True)
    assert line["ablation_value"] == "125 x 240"
    assert line["ablation_parameter"] == (
        "split.target_member = split.shadow_member x pretrain.epochs"
    )
    md = (tmp_path / "s.md").read_text()
    lira = out.filter((pl.col("attack") == "lira") & (pl.col("experiment") == "base")).row(
        0, named=True
    )
    assert f"{lira['auc']:.3f} [{lira['auc_ci_low']:.3f}, {lira['auc_ci_high']:.3f}]" in md
    assert md.count("\n| base") == 6 and markdown_table(out) == md
    ablation_figure(out, "k", tmp_path / "ablation.png")
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"


def test_roc_figure_writes_a_png(tmp_path):
    labels = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    scores = np.linspace(0, 1, 100)[::-1]
    rocs = {("shadow", "threshold"): roc_frame(labels, scores)}
    roc_figure(rocs, {("shadow", "threshold"): 1.0}, tmp_path / "roc.png", title="t")
    assert (tmp_path / "roc.png").stat().st_size > 1000


def _image_folder(root, classes: int, per_class: int, size: int = 16, seed: int = 0):
    """A class-sorted ``<class>/<image>.png`` folder of random images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / f"class{c}" / f"{i:03d}.png")


def test_pick_across_classes_spreads_over_labels_with_the_seed():
    # A class-sorted source: the first 8 rows are all label 0.
    rows = pl.DataFrame(
        {"sample_id": [f"s{i:03d}" for i in range(80)], "label": np.repeat(np.arange(10), 8)}
    )
    label = dict(zip(rows["sample_id"], rows["label"], strict=True))
    picked = pick_across_classes(rows, 8, seed=3)
    assert len(picked) == len(set(picked)) == 8
    assert len({label[s] for s in picked}) == 8  # one image each of 8 different classes
    assert picked == pick_across_classes(rows, 8, seed=3)
    assert picked != pick_across_classes(rows, 8, seed=4)
    assert picked != pick_across_classes(rows, 8, seed=3, stream=1)
    # More samples than classes: every class once, then again round-robin.
    many = pick_across_classes(rows, 25, seed=0)
    counts = np.bincount([label[s] for s in many], minlength=10)
    assert sorted(counts) == [2] * 5 + [3] * 5
    assert len(pick_across_classes(rows.head(5), 9, seed=0)) == 5


def test_reconstruction_grid_samples_members_across_classes(tmp_path, tiny_spec):
    import torch

    from mimia.data.prepare import write_manifest, write_shard
    from mimia.models import build_model

    root = tmp_path / "images"
    _image_folder(root, classes=4, per_class=10)
    dataset = {"name": "image_folder", "path": str(root), "img_size": 16}
    split = {r: 8 for r in ("target_member", "target_nonmember", "shadow_member")}
    split |= {"shadow_nonmember": 8, "shard_size": 8}
    manifest = tmp_path / "manifest.parquet"
    rows = write_manifest(dataset=dataset, split=split, seed=0, manifest=manifest)
    shards = {}
    for role in ("target_member", "target_nonmember"):
        shards[role] = tmp_path / f"{role}-000000.tar"
        write_shard(
            dataset=dataset,
            shard_size=8,
            manifest=manifest,
            role=role,
            index=0,
            shard=shards[role],
        )
    torch.manual_seed(0)
    model = build_model(tiny_spec).eval()
    out = tmp_path / "grid.png"
    reconstruction_figure(
        model, manifest, [shards["target_member"]], [shards["target_nonmember"]], 4, 0, 0.5, out
    )
    assert out.read_bytes()[:4] == b"\x89PNG"
    members = rows.filter(pl.col("role") == "target_member").sort("sample_id")
    picked = pick_across_classes(members.select("sample_id", "label"), 4, 0)
    labels = dict(zip(members["sample_id"], members["label"], strict=True))
    assert len({labels[s] for s in picked}) == members["label"].n_unique() >= 3
    # The old behaviour, the first images of the shard, would have been fewer classes here.
    assert members.head(4)["label"].n_unique() < len({labels[s] for s in picked})


def _error_table(per_image_means, num_masks, member_flags, decoder="released", ratio=0.75):
    """Long-format target errors: image i's K masks spread symmetrically around its mean."""
    rows = []
    spread = np.linspace(-1, 1, num_masks) * 0.5
    for i, (mean, member) in enumerate(zip(per_image_means, member_flags, strict=True)):
        for k in range(num_masks):
            rows.append(
                (f"s{i:04d}", "target", decoder, ratio, k, mean * (1 + spread[k]), bool(member))
            )
    return pl.DataFrame(
        rows,
        schema=["sample_id", "model", "decoder", "mask_ratio", "mask_index", "error", "is_member"],
        orient="row",
    )


def test_mask_ratio_stats_bootstrap_over_images_not_masks():
    rng = np.random.default_rng(1)
    means = np.r_[rng.gamma(4.0, 0.01, 60), rng.gamma(4.0, 0.012, 60)]
    member = np.r_[np.ones(60, bool), np.zeros(60, bool)]
    errors = _error_table(means, 8, member)
    stats = mask_ratio_stats(errors, n_bootstrap=2000, seed=7)
    assert stats["n_images"].to_list() == [60, 60]
    row = stats.filter(pl.col("is_member")).row(0, named=True)
    # Direct computation: per-image means, then a percentile bootstrap over the 60 images.
    draws = np.random.default_rng(7).integers(0, 60, (2000, 60))
    boot = means[:60][draws].mean(axis=1)
    assert row["mean"] == pytest.approx(means[:60].mean(), rel=1e-12)
    assert row["ci_low"] == pytest.approx(np.percentile(boot, 2.5), rel=1e-12)
    assert row["ci_high"] == pytest.approx(np.percentile(boot, 97.5), rel=1e-12)
    # Close to the normal interval of the per-image means, and far wider than treating the
    # 480 (image, mask) errors as independent would claim.
    se = means[:60].std(ddof=1) / np.sqrt(60)
    assert row["ci_high"] - row["ci_low"] == pytest.approx(2 * 1.96 * se, rel=0.15)
    flat = errors.filter(pl.col("is_member"))["error"].to_numpy()
    assert row["ci_high"] - row["ci_low"] > 1.5 * 2 * 1.96 * flat.std(ddof=1) / np.sqrt(480)


def test_bootstrap_mean_rejects_an_empty_sample():
    with pytest.raises(ValueError, match="empty"):
        bootstrap_mean([], 10, 0)


def test_error_vs_mask_ratio_draws_one_ratio_and_several(tmp_path):
    rng = np.random.default_rng(0)
    member = np.r_[np.ones(30, bool), np.zeros(30, bool)]
    one = _error_table(rng.gamma(4.0, 0.01, 60), 4, member)
    error_vs_mask_ratio(one, tmp_path / "one.png", title="one ratio")
    assert (tmp_path / "one.png").stat().st_size > 5000
    several = pl.concat(
        [
            _error_table(rng.gamma(4.0, 0.01 * (1 + r), 60), 4, member, decoder=d, ratio=r)
            for r in (0.5, 0.75)
            for d in ("released", "adapted")
        ]
    )
    stats = mask_ratio_stats(several)
    assert stats.height == 8 and (stats["ci_low"] < stats["mean"]).all()
    assert (stats["mean"] < stats["ci_high"]).all()
    error_vs_mask_ratio(several, tmp_path / "two.png")
    assert (tmp_path / "two.png").stat().st_size > 5000


def test_target_errors_refuses_samples_missing_from_the_manifest(tmp_path):
    """Every target error row gets its membership from the manifest; a sample the manifest
    lacks is an error (a left join made its is_member null and the histograms dropped it)."""
    member = np.r_[np.ones(3, bool), np.zeros(3, bool)]
    table = _error_table(np.full(6, 0.05), 2, member).drop("is_member")
    # another model's rows may name samples outside the manifest: only the target's count
    shadow = table.with_columns(model=pl.lit("shadow1"), sample_id=pl.lit("elsewhere"))
    write_parquet(pl.concat([table, shadow]), tmp_path / "errors.parquet", {})
    roles = ["target_member"] * 3 + ["target_nonmember"] * 3
    manifest = pl.DataFrame({"sample_id": [f"s{i:04d}" for i in range(6)], "role": roles})
    write_parquet(manifest, tmp_path / "manifest.parquet", {})
    joined = target_errors(tmp_path / "errors.parquet", tmp_path / "manifest.parquet")
    assert joined.height == 12 and joined["is_member"].null_count() == 0
    assert (
        joined.sort("sample_id", "mask_index")["is_member"].to_list()
        == np.repeat(member, 2).tolist()
    )
    write_parquet(manifest.head(5), tmp_path / "manifest.parquet", {})
    with pytest.raises(ValueError, match=r"1 target sample ids are not in the manifest .*'s0005'"):
        target_errors(tmp_path / "errors.parquet", tmp_path / "manifest.parquet")
