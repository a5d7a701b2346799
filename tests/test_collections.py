"""Usage collections given as images: a folder of real digits, half of them the target's
training images, is written as a shard the models can score, with its true fraction; images
of the adversary's roles, empty folders and copies are refused; the config checks the source."""

from __future__ import annotations

import tarfile

import polars as pl
import pytest
from PIL import Image

from mimia.config import resolve_experiments
from mimia.data.collections import COLLECTION_ROLE, write_collection
from mimia.data.prepare import write_manifest
from mimia.data.shards import load_images
from mimia.data.sources import load_source
from mimia.provenance import read_metadata
from mimia.verify import verify

DATASET = {"name": "digits", "img_size": 16}
SPLIT = {
    "target_member": 40,
    "target_nonmember": 40,
    "shadow_member": 40,
    "shadow_nonmember": 40,
    "shard_size": 40,
}


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    path = tmp_path_factory.mktemp("split") / "manifest.parquet"
    return path, write_manifest(dataset=DATASET, split=SPLIT, seed=3, manifest=path)


def _folder(root, split, roles: dict[str, int], outside: int = 0, copies: int = 0):
    """PNG files (lossless: the same pixels) of ``roles[r]`` images of each role, ``outside``
    digits outside the split and ``copies`` repeated images."""
    source = load_source(DATASET)
    chosen = [k for r, n in roles.items() for k in split.filter(pl.col("role") == r)["key"][:n]]
    known = set(split["content_sha256"])
    chosen += [
        k
        for i, k in enumerate(source.keys)
        if k not in set(split["key"]) and source.content_sha256(i) not in known
    ][:outside]
    root.mkdir()
    for k in chosen:
        Image.fromarray(source.native(int(k))).save(root / f"{k}.png")
    for k in chosen[:copies]:
        Image.fromarray(source.native(int(k))).save(root / f"copy-{k}.png")
    return root


def _write(folder, manifest, table, shard):
    return write_collection(
        name="owner",
        source={"name": "image_folder", "path": str(folder)},
        manifest=manifest,
        img_size=16,
        table=table,
        shard=shard,
        seed=3,
    )


def test_a_folder_becomes_a_shard_with_its_true_fraction(split, tmp_path):
    path, manifest = split
    folder = _folder(tmp_path / "owner", manifest, {"target_member": 4}, outside=4)
    source = {"name": "image_folder", "path": str(folder)}
    table, shard = tmp_path / "images.parquet", tmp_path / "images.tar"
    rows = write_collection(
        name="owner", source=source, manifest=path, img_size=16, table=table, shard=shard, seed=3
    )
    meta = read_metadata(table)
    assert float(meta["true_fraction"]) == 0.5
    assert meta["collection"] == "owner"
    assert meta["split_manifest_sha256"] == read_metadata(path)["manifest_sha256"]
    assert rows.height == 8 and set(rows["role"]) == {COLLECTION_ROLE}
    # Content hashes of the four member images are the split's, whatever the file names.
    members = set(manifest.filter(pl.col("role") == "target_member")["content_sha256"])
    assert sum(h in members for h in rows["content_sha256"]) == 4
    ids, images = load_images([shard])
    assert ids == sorted(rows["sample_id"])
    assert tuple(images.shape) == (8, 3, 16, 16)
    with tarfile.open(shard) as tar:
        assert len(tar.getnames()) == 3 * 8


def test_verify_checks_the_collection_shard_against_its_table(split, tmp_path):
    path, manifest = split
    exp = tmp_path / "results" / "x"
    (exp / "usage" / "owner").mkdir(parents=True)
    (exp / "manifest.parquet").write_bytes(path.read_bytes())
    folder = _folder(tmp_path / "owner", manifest, {"target_nonmember": 3}, outside=3)
    table, shard = exp / "usage/owner/images.parquet", exp / "usage/owner/images.tar"
    _write(folder, path, table, shard)
    assert float(read_metadata(table)["true_fraction"]) == 0.0
    code, lines = verify(exp)
    assert code == 0, "\n".join(lines)
    # A table edited after the shard was written no longer agrees with it.
    rows = pl.read_parquet(table).with_columns(pl.col("key").str.replace(".png", ".jpg"))
    meta = read_metadata(table)
    import pyarrow.parquet as pq

    arrow = rows.to_arrow().replace_schema_metadata(meta)
    pq.write_table(arrow, table)
    code, lines = verify(exp)
    assert code != 0 and any("images.tar" in line for line in lines), "\n".join(lines)


@pytest.mark.parametrize(
    ("roles", "outside", "copies", "message"),
    [
        ({"shadow_nonmember": 1, "target_member": 2}, 0, 0, "adversary's own data"),
        ({"target_member": 3}, 0, 1, "appear more than once"),
        ({}, 0, 0, "holds no images"),
    ],
)
def test_bad_collections_are_refused_and_leave_nothing(
    split, tmp_path, roles, outside, copies, message
):
    path, manifest = split
    folder = _folder(tmp_path / "owner", manifest, roles, outside, copies)
    table, shard = tmp_path / "images.parquet", tmp_path / "images.tar"
    with pytest.raises(ValueError, match=message):
        _write(folder, path, table, shard)
    assert not table.exists() and not shard.exists()


def _usage(collections: dict) -> dict:
    usage = {"enabled": True, "collections": collections}
    return {"experiments": {"u": {"usage": usage, "shadow": {"count": 4}}}}


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"name": "webdataset"}, "webdataset needs 'urls'"),
        ({"name": "image_folder"}, "image_folder needs 'path'"),
        ({"name": "cifar10", "path": "x"}, "cifar10"),
        ({"name": "image_folder", "path": "x", "role": "target_member"}, "role"),
    ],
)
def test_the_config_checks_a_collection_source(source, message):
    with pytest.raises(ValueError, match=message):
        resolve_experiments(_usage({"mine": {"source": source}}))


def test_the_config_accepts_a_collection_source(tmp_path):
    (exp,) = resolve_experiments(
        _usage({"mine": {"source": {"name": "webdataset", "urls": ["a.tar", "b.tar"]}}})
    ).values()
    assert exp["usage"]["collections"]["mine"]["source"]["urls"] == ["a.tar", "b.tar"]
