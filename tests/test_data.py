import numpy as np
import polars as pl
import pytest

from mimia.data.shards import load_images, shard_dataset, write_tar_shard
from mimia.data.sources import load_source
from mimia.data.splits import (
    ROLES,
    manifest_hash,
    shadow_membership,
    split_roles,
)

SIZES = {"target_member": 50, "target_nonmember": 40, "shadow_member": 30, "shadow_nonmember": 20}


@pytest.fixture(scope="module")
def digits():
    return load_source({"name": "digits"})


@pytest.fixture(scope="module")
def draw(digits):
    """``split_roles`` over the digits (their content hashes computed once)."""
    hashes = digits.content_hashes()

    def draw(sizes, seed, **kw):
        return split_roles(digits.keys, hashes, digits.labels, sizes, seed, "digits", **kw)

    return draw


def test_digits_are_real_images(digits):
    assert len(digits) == 1797
    img = digits.image(0, 16)
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    assert img.max() > 200 and img.min() == 0  # strokes on a black background


def test_split_is_disjoint_sized_and_deterministic(digits, draw):
    a = draw(SIZES, 7)
    b = draw(SIZES, 7)
    c = draw(SIZES, 8)
    assert a.equals(b)
    assert manifest_hash(a) == manifest_hash(b) != manifest_hash(c)
    assert a["source_index"].n_unique() == a.height == sum(SIZES.values())
    counts = dict(a.group_by("role").len().iter_rows())
    assert counts == SIZES
    # labels are the dataset's, not reassigned
    np.testing.assert_array_equal(
        a["label"].to_numpy(), digits.labels[a["source_index"].to_numpy()]
    )


def test_split_refuses_bad_sizes(draw):
    with pytest.raises(ValueError, match="only 1797"):
        draw({r: 500 for r in ROLES}, 0)
    with pytest.raises(ValueError, match="must be >= 1"):
        draw({**SIZES, "shadow_member": 0}, 0)
    with pytest.raises(ValueError, match="unknown roles"):
        draw({**SIZES, "train": 3}, 0)


def test_shadow_membership_halves_the_adversary_pool(draw):
    manifest = draw(SIZES, 0)
    m = shadow_membership(manifest, 3, seed=0)
    pool = set(manifest.filter(pl.col("role").str.starts_with("shadow"))["sample_id"])

    def trains_on(model):
        return set(m.filter((pl.col("model") == model) & pl.col("is_in"))["sample_id"])

    assert trains_on("shadow0") == set(
        manifest.filter(pl.col("role") == "shadow_member")["sample_id"]
    )
    for model in ("shadow1", "shadow2"):
        ids = trains_on(model)
        assert ids <= pool and len(ids) == len(pool) // 2
    assert trains_on("shadow1") != trains_on("shadow2")
    online = shadow_membership(manifest, 2, seed=0, include_targets=True)
    assert online.filter(pl.col("model") == "shadow1").height == manifest.height


def test_shard_round_trip(digits, draw, tmp_path):
    manifest = draw(SIZES, 0)
    rows = manifest.filter(pl.col("role") == "shadow_nonmember").sort("sample_id")
    path = tmp_path / "shadow_nonmember-000000.tar"
    write_tar_shard(rows, digits, 16, path)
    samples = list(shard_dataset([path]))
    assert [s[0] for s in samples] == rows["sample_id"].to_list()
    assert {s[2] for s in samples} == {"shadow_nonmember"}
    first = samples[0][1]
    assert first.shape == (3, 16, 16)
    np.testing.assert_array_equal(
        first.permute(1, 2, 0).numpy(), digits.image(rows["source_index"][0], 16)
    )
    wanted = set(rows["sample_id"][:5])
    ids, imgs = load_images([path], wanted)
    assert set(ids) == wanted and imgs.shape == (5, 3, 16, 16)
    with pytest.raises(ValueError, match="not in the shards"):
        load_images([path], {"digits-9999999"})


def test_missing_local_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_source({"name": "image_folder", "path": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="unknown dataset"):
        load_source({"name": "mnist"})


def test_shadow_classes_shift_the_adversary_distribution(draw):
    m = draw(SIZES, 0, shadow_classes=[0, 1, 2])
    shadow = m.filter(pl.col("role").str.starts_with("shadow"))
    assert set(shadow["label"]) == {0, 1, 2}
    assert len(set(m.filter(pl.col("role") == "target_member")["label"])) == 10
    assert m["source_index"].n_unique() == m.height
    with pytest.raises(ValueError, match="classes \\[0\\]"):
        draw({**SIZES, "shadow_member": 300}, 0, shadow_classes=[0])


def test_roles_from_an_assignment_of_image_folder_paths(tmp_path):
    from PIL import Image

    from mimia.config import resolve_experiments
    from mimia.data.splits import assigned_roles, read_assignment

    root = tmp_path / "images"
    rows = []
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / cls / f"{i}.png")
            rows.append((f"{cls}/{i}.png", ROLES[i]))
    csv = tmp_path / "roles.csv"
    pl.DataFrame(rows, schema=["key", "role"], orient="row").write_csv(csv)
    src = load_source({"name": "image_folder", "path": str(root)})
    assert src.keys[0] == "cat/0.png"
    manifest = assigned_roles(
        read_assignment(csv), src.keys, src.labels, "folder", src.content_sha256
    )
    assert dict(manifest.group_by("role").len().iter_rows()) == dict.fromkeys(ROLES, 2)
    member = manifest.filter(pl.col("role") == "target_member").sort("source_index")
    assert [src.keys[i] for i in member["source_index"]] == ["cat/0.png", "dog/0.png"]
    assert member["label"].to_list() == [0, 1]
    # The config takes role sizes from the file, before any job runs.
    cfg = {
        "defaults": {
            "dataset": {"name": "image_folder", "path": str(root), "img_size": 8},
            "model": {"patch_size": 4, "encoder_overrides": {"embed_dim": 32, "num_heads": 2}},
            "pretrain": {"batch_size": 2, "warmup_epochs": 1},
            "adapt": {"batch_size": 2, "warmup_epochs": 1},
        },
        "experiments": {"audit": {"split": {"assignment": str(csv)}}},
    }
    assert resolve_experiments(cfg)["audit"]["split"]["target_member"] == 2
    bad = tmp_path / "bad.csv"
    pl.DataFrame({"key": ["cat/0.png", "cat/9.png"], "role": ["target_member"] * 2}).write_csv(bad)
    with pytest.raises(ValueError, match="not in dataset"):
        assigned_roles(read_assignment(bad), src.keys, src.labels, "folder", src.content_sha256)
    pl.DataFrame({"key": ["cat/0.png"], "role": ["training"]}).write_csv(bad)
    with pytest.raises(ValueError, match="unknown roles \\['training'\\]"):
        read_assignment(bad)


def test_manifest_rows_record_key_and_content_hash(tmp_path):
    import hashlib

    from sklearn.datasets import load_digits

    from mimia.data.prepare import write_manifest
    from mimia.provenance import read_metadata

    path = tmp_path / "manifest.parquet"
    manifest = write_manifest(
        dataset={"name": "digits", "img_size": 16}, split=SIZES, seed=3, manifest=path
    )
    assert pl.read_parquet(path).equals(manifest)
    assert manifest.columns == [
        "sample_id", "source_index", "key", "content_sha256", "label", "role"
    ]  # fmt: skip
    # Independently: the digits' pixels as 8x8 RGB with their shape, hashed.
    pixels = np.round(load_digits().images * (255 / 16)).astype(np.uint8)
    for row in manifest.iter_rows(named=True):
        i = row["source_index"]
        rgb = np.repeat(pixels[i][..., None], 3, axis=2)
        assert row["key"] == str(i)
        assert row["content_sha256"] == hashlib.sha256(b"8x8x3\n" + rgb.tobytes()).hexdigest()
    # Without duplicates the draw is the plain seeded permutation of all images.
    order, start = np.random.default_rng(3).permutation(len(pixels)), 0
    for role in ROLES:
        rows = manifest.filter(pl.col("role") == role).sort("source_index")
        assert rows["source_index"].to_list() == sorted(order[start : start + SIZES[role]])
        start += SIZES[role]
    meta = read_metadata(path)
    assert meta["manifest_sha256"] == manifest_hash(manifest)
    assert (meta["seed"], meta["dataset"], meta["duplicates_dropped"]) == ("3", "digits", "0")


def test_stage_api_writes_membership_and_reproducible_shards(digits, tmp_path):
    from mimia.data.prepare import write_manifest, write_membership, write_shard
    from mimia.provenance import read_metadata

    dataset = {"name": "digits", "img_size": 16}
    manifest = write_manifest(dataset=dataset, split=SIZES, seed=0, manifest=tmp_path / "m.pq")
    membership = write_membership(
        manifest=tmp_path / "m.pq", model="shadow2", online=True, seed=0, membership=tmp_path / "s"
    )
    everyone = shadow_membership(manifest, 3, 0, include_targets=True)
    assert membership.equals(everyone.filter(pl.col("model") == "shadow2"))
    # A model's half does not depend on how many models there are.
    assert membership.equals(
        shadow_membership(manifest, 5, 0, include_targets=True).filter(pl.col("model") == "shadow2")
    )
    meta = read_metadata(tmp_path / "s")
    assert (meta["seed"], meta["manifest_sha256"]) == ("0", manifest_hash(manifest))
    # Shard 1 of target_member (shard_size 20): rows 20..39 of the role in sample-id order.
    for name in ("a.tar", "b.tar"):
        write_shard(
            dataset=dataset,
            shard_size=20,
            manifest=tmp_path / "m.pq",
            role="target_member",
            index=1,
            shard=tmp_path / name,
        )
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    rows = manifest.filter(pl.col("role") == "target_member").sort("sample_id")[20:40]
    samples = list(shard_dataset([tmp_path / "a.tar"]))
    assert [s[0] for s in samples] == rows["sample_id"].to_list()
    for (_, img, role), i in zip(samples, rows["source_index"], strict=True):
        assert role == "target_member"
        np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), digits.image(i, 16))
    with pytest.raises(ValueError, match="would be empty"):
        write_shard(
            dataset=dataset,
            shard_size=20,
            manifest=tmp_path / "m.pq",
            role="target_member",
            index=3,
            shard=tmp_path / "c.tar",
        )


def _png(path, seed, size=8):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def test_source_fingerprint_follows_the_listing(tmp_path):
    import os

    from mimia.data.sources import source_fingerprint

    root = tmp_path / "images"
    for i in range(6):
        _png(root / f"c{i % 2}" / f"{i}.png", i)
    folder = {"name": "image_folder", "path": str(root)}
    base = source_fingerprint(folder)
    assert source_fingerprint(folder) == base
    # Hidden files (.DS_Store, macOS ._ resource forks) are neither images nor listed.
    (root / "c0" / "._0.png").write_bytes(b"\0\5\26\7")
    (root / ".DS_Store").write_bytes(b"x")
    assert source_fingerprint(folder) == base
    assert "c0/._0.png" not in load_source(folder).keys
    seen = {base}
    _png(root / "c1" / "new.png", 99)  # added
    seen.add(source_fingerprint(folder))
    (root / "c0" / "0.png").unlink()  # removed
    seen.add(source_fingerprint(folder))
    _png(root / "c0" / "2.png", 7, size=9)  # replaced (other size)
    seen.add(source_fingerprint(folder))
    before = source_fingerprint(folder)
    st = (root / "c0" / "4.png").stat()
    os.utime(root / "c0" / "4.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1000))  # touched
    assert source_fingerprint(folder) == before  # same bytes: unchanged
    assert len(seen) == 4
    # torchvision: the files of the dataset's own folder under path.
    tv = {"name": "cifar10", "path": str(tmp_path / "tv"), "download": True}
    absent = source_fingerprint(tv)
    (tmp_path / "tv" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp_path / "tv" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"a" * 10)
    present = source_fingerprint(tv)
    (tmp_path / "tv" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"a" * 11)
    assert len({absent, present, source_fingerprint(tv)}) == 3
    assert source_fingerprint({**tv, "split": "test"}) != source_fingerprint(tv)
    digits = source_fingerprint({"name": "digits"})
    assert digits == source_fingerprint({"name": "digits"}) != base


def test_webdataset_fingerprint_follows_its_shards(tmp_path):
    import io
    import tarfile

    from mimia.data.sources import source_fingerprint

    def shard(path, n):
        with tarfile.open(path, "w") as tar:
            for i in range(n):
                data = f"{i}".encode()
                info = tarfile.TarInfo(f"s{i}.cls")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    shard(tmp_path / "w-0.tar", 2)
    shard(tmp_path / "w-1.tar", 2)
    cfg = {"name": "webdataset", "urls": str(tmp_path / "w-{0..1}.tar")}
    before = source_fingerprint(cfg)
    assert source_fingerprint({**cfg, "urls": [str(tmp_path / f"w-{i}.tar") for i in (0, 1)]}) == (
        before
    )
    shard(tmp_path / "w-1.tar", 3)
    assert source_fingerprint(cfg) != before


def test_data_stages_do_not_import_torch(tmp_path):
    """The split and shard stages stay light: no torch (about 1.5 s per job) and no polars at
    import of the sources module."""
    import subprocess
    import sys
    from pathlib import Path

    import mimia

    for i in range(8):
        _png(tmp_path / "images" / f"c{i % 2}" / f"{i}.png", i)
    code = f"""
import sys
import mimia.data.sources
assert "torch" not in sys.modules and "polars" not in sys.modules, "sources imports too much"
from mimia.data.prepare import write_manifest, write_shard
from mimia.data.sources import source_fingerprint
ds = {{"name": "image_folder", "path": {str(tmp_path / "images")!r}, "img_size": 8}}
source_fingerprint(ds)
split = dict.fromkeys(["target_member", "target_nonmember", "shadow_member",
                       "shadow_nonmember"], 2)
write_manifest(dataset=ds, split=split, seed=0, manifest={str(tmp_path / "m.pq")!r})
write_shard(dataset=ds, shard_size=2, manifest={str(tmp_path / "m.pq")!r}, role="shadow_member",
            index=0, shard={str(tmp_path / "s.tar")!r})
print("torch" in sys.modules)
"""
    env = {"PYTHONPATH": str(Path(mimia.__file__).parents[1]), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    assert (tmp_path / "s.tar").exists()


def test_provenance_records_software_and_machine():
    import platform
    import subprocess
    import sys
    from pathlib import Path

    import torch

    import mimia
    from mimia.provenance import provenance

    meta = provenance(seed=3, sizes={"a": 1})
    assert (meta["seed"], meta["sizes"]) == ("3", '{"a": 1}')
    assert meta["torch_version"] == torch.__version__
    assert meta["torch_threads"] == str(torch.get_num_threads())
    assert meta["numpy_version"] == np.__version__
    assert meta["python_version"] == platform.python_version()
    cpu = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
    assert meta["cpu"] == cpu[0].split(":", 1)[1].strip()
    # A light stage: the versions without importing torch, and no thread count.
    code = (
        "import sys; from mimia.provenance import provenance; m = provenance(); "
        "print(m['torch_version'], 'torch_threads' in m, 'torch' in sys.modules)"
    )
    env = {"PYTHONPATH": str(Path(mimia.__file__).parents[1]), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    version, threads, imported = out.stdout.split()
    assert torch.__version__.startswith(version)
    assert (threads, imported) == ("False", "False")
