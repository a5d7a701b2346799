import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from mimia.data.shards import write_tar_shard
from mimia.data.sources import load_source
from mimia.data.splits import split_roles
from mimia.extract import ERROR_SCHEMA, extract_shard
from mimia.masking import deterministic_masks
from mimia.models import build_model
from mimia.models.scoring import score_batch
from mimia.provenance import read_metadata


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    src = load_source({"name": "digits"})
    sizes = {
        "target_member": 24,
        "target_nonmember": 10,
        "shadow_member": 10,
        "shadow_nonmember": 10,
    }
    manifest = split_roles(src.keys, src.content_hashes(), src.labels, sizes, 0, "digits")
    path = tmp_path_factory.mktemp("shards") / "target_member-000000.tar"
    write_tar_shard(manifest.filter(pl.col("role") == "target_member"), src, 16, path)
    return path


def _extract(model, shard, out, **kw):
    args = dict(
        model_name="target",
        decoder="released",
        seed=5,
        mask_ratios=[0.5, 0.75],
        num_masks=3,
        batch_size=10,
        num_workers=0,
        metadata={"seed": "5", "manifest_sha256": "abc"},
    )
    return extract_shard(model, shard, out, **(args | kw))


def test_error_table_schema_values_and_metadata(tiny_spec, shard, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_spec).eval()
    out = tmp_path / "e.parquet"
    assert _extract(model, shard, out) == 24 * 2 * 3
    table = pq.read_table(out)
    assert table.schema.remove_metadata().equals(ERROR_SCHEMA)
    assert read_metadata(out) == {"seed": "5", "manifest_sha256": "abc"}
    df = pl.from_arrow(table)
    assert df["sample_id"].n_unique() == 24
    assert df.group_by("sample_id", "mask_ratio").len()["len"].unique().to_list() == [3]
    assert (df["patch_error_min"] <= df["patch_error_median"]).all()
    assert (df["patch_error_median"] <= df["patch_error_max"]).all()
    # The masked-patch error is the model's own loss under the same mask.
    row = df.filter((pl.col("mask_index") == 2) & (pl.col("mask_ratio") == 0.75)).row(0, named=True)
    from mimia.data.shards import shard_dataset

    img = next(img for sid, img, _ in shard_dataset([shard]) if sid == row["sample_id"])
    mask = deterministic_masks(5, [row["sample_id"]], 0.75, [2], 4)[:, 0]
    with torch.inference_mode():
        loss, _ = model(img[None].float() / 255, mask)
    assert row["error"] == pytest.approx(loss.item(), rel=1e-5)


def test_masks_identical_across_models_batches_and_runs(tiny_spec, shard, tmp_path):
    torch.manual_seed(0)
    a = build_model(tiny_spec).eval()
    torch.manual_seed(1)
    b = build_model(tiny_spec).eval()
    imgs = torch.randint(0, 255, (6, 3, 16, 16), dtype=torch.uint8)
    ids = [f"s{i}" for i in range(6)]
    # Same image under the same key scores the same in any batch composition.
    full = score_batch(a, imgs, ids, 0, 0.75, 4)["error"]
    part = score_batch(a, imgs[3:], ids[3:], 0, 0.75, 4)["error"]
    torch.testing.assert_close(full[3:], part, rtol=1e-5, atol=1e-6)
    # Two runs write identical tables; two models differ only in the error values.
    _extract(a, shard, tmp_path / "a1.parquet")
    _extract(a, shard, tmp_path / "a2.parquet")
    _extract(b, shard, tmp_path / "b.parquet", model_name="other")
    t1, t2 = pl.read_parquet(tmp_path / "a1.parquet"), pl.read_parquet(tmp_path / "a2.parquet")
    assert t1.equals(t2)
    tb = pl.read_parquet(tmp_path / "b.parquet")
    keys = ["sample_id", "mask_ratio", "mask_index"]
    assert t1.select(keys).equals(tb.select(keys))
    assert not t1["error"].equals(tb["error"])


def test_deterministic_masks_are_a_pure_function_of_the_key():
    m1 = deterministic_masks(0, ["a", "b"], 0.75, [0, 1, 2], 8)
    m2 = deterministic_masks(0, ["b"], 0.75, [2, 1], 8)
    assert torch.equal(m1[1, 2], m2[0, 0]) and torch.equal(m1[1, 1], m2[0, 1])
    assert (m1.sum(-1) == 64 - int(64 * 0.25)).all()
    assert not torch.equal(m1[0, 0], m1[0, 1]) and not torch.equal(m1[0, 0], m1[1, 0])
    assert not torch.equal(m1, deterministic_masks(1, ["a", "b"], 0.75, [0, 1, 2], 8))


def test_augmented_views_are_keyed_and_similarities_bounded(tiny_spec):
    from mimia.extract import augmented_views, view_similarities

    imgs = torch.randint(0, 255, (3, 3, 16, 16), dtype=torch.uint8)
    v1 = augmented_views(imgs, ["a", "b", "c"], 0, 4)
    v2 = augmented_views(imgs[1:], ["b", "c"], 0, 4)
    assert v1.shape == (3, 4, 3, 16, 16) and torch.equal(v1[1:], v2)
    assert not torch.equal(v1, augmented_views(imgs, ["a", "b", "c"], 1, 4))
    torch.manual_seed(0)
    sims = view_similarities(build_model(tiny_spec).eval(), v1)
    assert sims.shape == (3, 6)
    assert (sims <= 1 + 1e-5).all() and (sims >= -1 - 1e-5).all()


@pytest.fixture
def stage_inputs(tiny_spec, tmp_path):
    """A saved random tiny model and a manifest stub: what the scoring stages read."""
    from mimia.models.checkpoint import save_model
    from mimia.provenance import write_parquet

    torch.manual_seed(0)
    save_model(build_model(tiny_spec).eval(), tmp_path / "model.safetensors")
    manifest = tmp_path / "manifest.parquet"
    write_parquet(pl.DataFrame({"sample_id": ["a"]}), manifest, {"manifest_sha256": "abc"})
    return tmp_path / "model.safetensors", manifest


def test_extract_stage_runs_and_records_the_runtime_precision(stage_inputs, shard, tmp_path):
    from mimia.stages import extract

    checkpoint, manifest = stage_inputs

    def run(precision):
        out = tmp_path / f"errors-{precision}.parquet"
        extract(
            checkpoint=checkpoint,
            shard=shard,
            manifest=manifest,
            errors=out,
            model="target",
            decoder="released",
            seed=3,
            mask_ratios=[0.75],
            num_masks=2,
            runtime={"device": "cpu", "batch_size": 8, "num_workers": 0, "precision": precision},
        )
        return pl.read_parquet(out)["error"].to_numpy(), read_metadata(out)["precision"]

    auto, auto_used = run("auto")
    bf16, bf16_used = run("bf16")
    # "auto" is float32 on the CPU; bf16 moves the errors within its rounding, and says so.
    assert (auto_used, bf16_used) == ("fp32", "bf16")
    rel = np.abs(bf16 - auto) / auto
    assert 1e-6 < rel.max() < 0.02


def test_embed_stage_computes_on_the_runtime_device(stage_inputs, shard, tmp_path):
    """The embed rule reserves a GPU, so the stage must compute on runtime.device: on CUDA
    it does (and agrees with the CPU), without CUDA asking for it is an error, not a silent
    CPU run."""
    from mimia.stages import embed

    checkpoint, manifest = stage_inputs

    def run(device):
        out = tmp_path / f"embeddings-{device}.parquet"
        embed(
            checkpoint=checkpoint,
            shards=[shard],
            manifest=manifest,
            embeddings=out,
            model="target",
            seed=3,
            num_views=3,
            runtime={"device": device, "batch_size": 8},
        )
        return np.array(pl.read_parquet(out)["similarities"].to_list())

    on_cpu = run("cpu")
    assert on_cpu.shape == (24, 3)
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError), match=r"CUDA|NVIDIA"):
            run("cuda")
        return
    torch.cuda.reset_peak_memory_stats()
    on_gpu = run("cuda")
    assert torch.cuda.max_memory_allocated() > 0
    # cuDNN may run the patch embedding in TF32: agreement to 1e-3, not to the last bit
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-3)
