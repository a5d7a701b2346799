"""Faults in the data: folders that change between split and shard, duplicates, bad images."""

import hashlib
import io
import shutil
import tarfile

import numpy as np
import polars as pl
import pytest
from PIL import Image, PngImagePlugin

from mimia.data.prepare import write_manifest, write_shard
from mimia.data.shards import shard_dataset
from mimia.data.sources import ImageDecodeError, load_source, source_fingerprint
from mimia.data.splits import ROLES
from mimia.provenance import read_metadata

FOUR = dict.fromkeys(ROLES, 3)


def noise(seed, size=8):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def folder(root, n=12, classes=("a", "b")):
    """``n`` distinct random PNGs in class folders: ``<root>/<class>/<i>.png``."""
    for i in range(n):
        path = root / classes[i % len(classes)] / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise(i)).save(path)
    return {"name": "image_folder", "path": str(root), "img_size": 8}


def shard_all(dataset, manifest, out):
    """Try every role's shard 0; ``{role: error or None}``."""
    results = {}
    for role in ROLES:
        try:
            write_shard(
                dataset=dataset,
                shard_size=3,
                manifest=manifest,
                role=role,
                index=0,
                shard=out / f"{role}.tar",
            )
            results[role] = None
        except ValueError as err:
            results[role] = str(err)
    return results


def test_folder_changed_between_split_and_shard_fails_the_shard(tmp_path):
    """Issue 13 item 1: a corrupt JPEG, fixed by deleting it, then files removed and added
    between the split and the shards. Index-based shards put 10 images in two roles; now the
    shards read images by path and check their content."""
    root = tmp_path / "images"
    dataset = folder(root)
    bad = root / "a" / "000_bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    manifest = tmp_path / "manifest.parquet"
    with pytest.raises(ImageDecodeError, match=f"a/000_bad.jpg.*{bad}"):
        write_manifest(dataset=dataset, split=FOUR, seed=0, manifest=manifest)
    assert not manifest.exists()
    with_bad = source_fingerprint(dataset)
    bad.unlink()  # the user's fix
    assert source_fingerprint(dataset) != with_bad  # so the workflow reruns the split
    df = write_manifest(dataset=dataset, split=FOUR, seed=0, manifest=manifest)
    original = {
        p.relative_to(root).as_posix(): np.asarray(Image.open(p)) for p in root.rglob("*.png")
    }
    before = source_fingerprint(dataset)

    # The first file in sorted order goes (shifting every later index) and a new one arrives.
    gone = "a/000.png"
    (root / gone).unlink()
    Image.fromarray(noise(100)).save(root / "a" / "0000_new.png")
    assert source_fingerprint(dataset) != before
    results = shard_all(dataset, manifest, tmp_path)
    role_of_gone = df.filter(pl.col("key") == gone)["role"].item()
    sid = df.filter(pl.col("key") == gone)["sample_id"].item()
    message = results[role_of_gone]
    assert message is not None
    assert f"sample {sid!r}, key {gone!r}: {root / gone} does not exist" in message
    assert not (tmp_path / f"{role_of_gone}.tar").exists()
    assert not list(tmp_path.glob("*.tmp"))
    # The other shards hold exactly the images the manifest names: no role sees another's.
    seen = {}
    for role, err in results.items():
        if role == role_of_gone:
            continue
        assert err is None
        rows = df.filter(pl.col("role") == role).sort("sample_id")
        samples = list(shard_dataset([tmp_path / f"{role}.tar"]))
        for (sample_id, img, _), key in zip(samples, rows["key"], strict=True):
            np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), original[key])
            seen[hashlib.sha256(img.numpy().tobytes()).hexdigest()] = sample_id
    assert len(seen) == 3 * 3

    # A file replaced under its own name: the shard names it and what it holds now.
    victim = df.filter(pl.col("role") == "shadow_nonmember")["key"][0]
    Image.fromarray(noise(200)).save(root / victim)
    (tmp_path / "shadow_nonmember.tar").unlink()
    message = shard_all(dataset, manifest, tmp_path)["shadow_nonmember"]
    assert f"key {victim!r}: {root / victim} holds another image" in message
    assert not (tmp_path / "shadow_nonmember.tar").exists()


def test_shards_open_files_by_path_without_listing(tmp_path, monkeypatch):
    import mimia.data.sources as sources

    dataset = folder(tmp_path / "images")
    write_manifest(dataset=dataset, split=FOUR, seed=1, manifest=tmp_path / "m.pq")

    def no_listing(root):
        raise AssertionError(f"listed {root}")

    monkeypatch.setattr(sources, "_walk_images", no_listing)
    assert shard_all(dataset, tmp_path / "m.pq", tmp_path) == dict.fromkeys(ROLES)


def test_old_or_foreign_manifest_is_refused(tmp_path):
    dataset = folder(tmp_path / "images")
    df = write_manifest(dataset=dataset, split=FOUR, seed=0, manifest=tmp_path / "m.pq")
    df.drop("key", "content_sha256").write_parquet(tmp_path / "old.pq")
    with pytest.raises(ValueError, match=r"lacks columns \['content_sha256', 'key'\].*rerun"):
        write_shard(
            dataset=dataset,
            shard_size=3,
            manifest=tmp_path / "old.pq",
            role="target_member",
            index=0,
            shard=tmp_path / "s.tar",
        )
    with pytest.raises(ValueError, match="drawn from dataset 'image_folder', not 'digits'"):
        write_shard(
            dataset={"name": "digits", "img_size": 8},
            shard_size=3,
            manifest=tmp_path / "m.pq",
            role="target_member",
            index=0,
            shard=tmp_path / "s.tar",
        )


# -- duplicates (issue 11) ---------------------------------------------------------------------
def with_copies(root):
    """12 distinct images plus 3 copies: a byte copy, a re-encoded copy (BMP: other bytes,
    same pixels) and a copy in another class. Returns ``(dataset, {copy: original})``."""
    dataset = folder(root)
    copies = {"a/000_dup.png": "a/000.png", "b/zz.bmp": "b/001.png", "b/002.png": "a/002.png"}
    shutil.copy(root / "a/000.png", root / "a/000_dup.png")
    Image.open(root / "b/001.png").save(root / "b/zz.bmp")
    shutil.copy(root / "a/002.png", root / "b/002.png")
    return dataset, copies


def test_dedupe_keeps_the_first_copy_and_reports_the_others(tmp_path, capfd):
    dataset, copies = with_copies(tmp_path / "images")
    assert (tmp_path / "images/b/zz.bmp").read_bytes() != (
        tmp_path / "images/b/001.png"
    ).read_bytes()
    src = load_source(dataset)
    assert len(src) == 15
    path = tmp_path / "m.pq"
    # 12 distinct images: every one is drawn, each exactly once.
    df = write_manifest(dataset=dataset, split=FOUR, seed=0, manifest=path)
    assert df["content_sha256"].n_unique() == df.height == 12
    kept = set(df["key"])
    # The first copy in key order stays: "a/000.png" < "a/000_dup.png", "a/002.png" < "b/002.png"
    # and "b/001.png" < "b/zz.bmp".
    assert kept.isdisjoint({"a/000_dup.png", "b/002.png", "b/zz.bmp"})
    assert {"a/000.png", "a/002.png", "b/001.png"} <= kept
    meta = read_metadata(path)
    assert (meta["dedupe"], meta["duplicates_found"], meta["duplicates_dropped"]) == (
        "true",
        "3",
        "3",
    )
    assert sorted(map(tuple, pl.Series([meta["duplicates"]]).str.json_decode()[0])) == sorted(
        copies.items()
    )
    assert "3 duplicate copies dropped" in capfd.readouterr().err
    with pytest.raises(ValueError, match="has only 12 after dropping 3 duplicate copies"):
        write_manifest(
            dataset=dataset, split={**FOUR, "shadow_member": 4}, seed=0, manifest=tmp_path / "x"
        )


def test_without_dedupe_copies_are_never_split_across_roles(tmp_path):
    dataset, copies = with_copies(tmp_path / "images")
    split = {**FOUR, "shadow_nonmember": 6, "dedupe": False}  # all 15 images are drawn
    refused = 0
    for seed in range(6):
        try:
            df = write_manifest(dataset=dataset, split=split, seed=seed, manifest=tmp_path / "m")
        except ValueError as err:
            refused += 1
            msg = str(err)
            assert "puts identical images in different roles" in msg
            assert any(f"{a!r} (" in msg and f"{b!r} (" in msg for a, b in copies.items())
            continue
        # Allowed only when every pair of copies shares its role.
        roles = dict(df.select("key", "role").iter_rows())
        assert all(roles[a] == roles[b] for a, b in copies.items())
    assert refused > 0


def test_assignment_with_copies_in_two_roles_is_refused(tmp_path):
    dataset, copies = with_copies(tmp_path / "images")
    keys = load_source(dataset).keys
    plain = [k for k in keys if k not in copies and k != "a/000.png"]
    rows = [(k, ROLES[i % 4]) for i, k in enumerate(plain)]
    csv = tmp_path / "roles.csv"

    def assign(extra):
        pl.DataFrame(rows + extra, schema=["key", "role"], orient="row").write_csv(csv)
        return write_manifest(
            dataset=dataset, split={"assignment": str(csv)}, seed=0, manifest=tmp_path / "m"
        )

    with pytest.raises(
        ValueError, match=r"'a/000.png' \(target_member\) = 'a/000_dup.png' \(shadow_member\)"
    ):
        assign([("a/000.png", "target_member"), ("a/000_dup.png", "shadow_member")])
    df = assign([("a/000.png", "target_member"), ("a/000_dup.png", "target_member")])
    assert df.height == len(plain) + 2
    meta = read_metadata(tmp_path / "m")
    assert (meta["duplicates_found"], meta["duplicates_dropped"]) == ("1", "0")
    assert meta["duplicates"] == '[["a/000_dup.png", "a/000.png"]]'


def test_webdataset_copies_under_two_keys_are_deduplicated(tmp_path):
    def png(pixels):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        return buf.getvalue()

    samples = {f"k{i:02d}": png(noise(i)) for i in range(12)}
    samples["k99"] = samples["k03"]
    with tarfile.open(tmp_path / "src-0.tar", "w") as tar:
        for key, data in samples.items():
            for ext, payload in (("png", data), ("cls", b"1")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    dataset = {"name": "webdataset", "urls": str(tmp_path / "src-0.tar"), "img_size": 8}
    df = write_manifest(dataset=dataset, split=FOUR, seed=0, manifest=tmp_path / "m")
    assert "k99" not in set(df["key"]) and "k03" in set(df["key"])
    assert read_metadata(tmp_path / "m")["duplicates"] == '[["k99", "k03"]]'
    assert shard_all(dataset, tmp_path / "m", tmp_path) == dict.fromkeys(ROLES)
    # A key the shards no longer hold is named with its sample.
    role = df.filter(pl.col("key") == "k03")["role"].item()
    df.with_columns(
        key=pl.when(pl.col("key") == "k03").then(pl.lit("k77")).otherwise("key")
    ).write_parquet(tmp_path / "m2")
    message = shard_all(dataset, tmp_path / "m2", tmp_path)[role]
    assert "key 'k77': dataset 'webdataset' has no image of this key" in message


# -- image decoding (issue 13 item 8) ------------------------------------------------------------
def test_truncated_and_corrupt_images_name_the_file(tmp_path):
    root = tmp_path / "images" / "c"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    (root / "scan.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # cut in the image data
    # A PNG cut inside a metadata chunk: PIL says only "Truncated File Read".
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * 5000)
    buf = io.BytesIO()
    Image.fromarray(noise(1)).save(buf, "PNG", pnginfo=info)
    (root / "header.png").write_bytes(buf.getvalue()[:2000])
    (root / "garbage.png").write_bytes(b"not an image at all")
    src = load_source({"name": "image_folder", "path": str(tmp_path / "images")})
    reasons = {}
    for i, key in enumerate(src.keys):
        with pytest.raises(ImageDecodeError) as err:
            src.native(i)
        assert f"cannot decode image {key!r} ({root / key.split('/')[1]})" in str(err.value)
        reasons[key] = str(err.value)
    assert "Truncated File Read" in reasons["c/header.png"]
    assert "truncated" in reasons["c/scan.jpg"]
    assert "cannot identify" in reasons["c/garbage.png"]


def test_16_bit_greyscale_is_scaled_not_saturated(tmp_path):
    root = tmp_path / "images" / "c"
    root.mkdir(parents=True)
    values = np.array([0, 1, 128, 129, 257, 385, 386, 32767, 40000, 65278, 65535], np.uint16)
    grid = np.resize(values, (16, 16)).astype(np.uint16)
    Image.fromarray(grid).save(root / "g16.png")
    assert Image.open(root / "g16.png").mode in ("I;16", "I")  # the mode PIL clips
    src = load_source({"name": "image_folder", "path": str(tmp_path / "images")})
    out = src.native(0)
    expected = np.round(grid.astype(np.float64) / 257).astype(np.uint8)
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, axis=2))
    # PIL's own conversion clips: mid-grey 32767 would be white.
    mid = np.argwhere(grid == 32767)[0]
    assert np.asarray(Image.open(root / "g16.png").convert("RGB"))[tuple(mid)].tolist() == [255] * 3
    assert out[tuple(mid)].tolist() == [127] * 3
    # 32-bit integers beyond 16 bits are refused, naming the file.
    Image.fromarray(np.full((4, 4), 1 << 20, np.int32)).save(root / "i32.tif")
    src = load_source({"name": "image_folder", "path": str(tmp_path / "images")})
    with pytest.raises(ImageDecodeError, match=r"i32.tif.*values in \[1048576, 1048576\]"):
        src.native(src.keys.index("c/i32.tif"))


def test_palette_alpha_and_cmyk_images_convert_to_rgb(tmp_path):
    root = tmp_path / "images" / "c"
    root.mkdir(parents=True)
    rgb = noise(5)
    rgba = np.dstack([rgb, np.arange(64, dtype=np.uint8).reshape(8, 8) * 4])
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.fromarray(np.dstack([rgb[..., 0], rgba[..., 3]]), "LA").save(root / "la.png")
    palette = Image.fromarray(rgb).quantize(16)
    palette.save(root / "p.png")
    palette.save(root / "pt.png", transparency=0)
    cmyk = np.random.default_rng(6).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(root / "cmyk.tif")
    src = load_source({"name": "image_folder", "path": str(tmp_path / "images")})
    out = {k: src.native(i) for i, k in enumerate(src.keys)}
    assert all(a.dtype == np.uint8 and a.shape == (8, 8, 3) for a in out.values())
    np.testing.assert_array_equal(out["c/rgba.png"], rgb)  # alpha dropped
    np.testing.assert_array_equal(out["c/la.png"], np.repeat(rgb[..., :1], 3, axis=2))
    colours = np.asarray(palette.getpalette(), np.uint8).reshape(-1, 3)
    expected = colours[np.asarray(palette)]
    np.testing.assert_array_equal(out["c/p.png"], expected)
    np.testing.assert_array_equal(out["c/pt.png"], expected)
    # CMYK without a colour profile: R = (255 - C)(255 - K) / 255, likewise G and B.
    c = cmyk.astype(np.float64)
    naive = (255 - c[..., :3]) * (255 - c[..., 3:]) / 255
    assert np.abs(out["c/cmyk.tif"] - naive).max() <= 1
