import numpy as np
import polars as pl
import pytest

from mimia.data.shards import iter_shards, load_images, write_tar_shard
from mimia.data.sources import load_source
from mimia.data.splits import (
    ROLES,
    manifest_hash,
    shadow_membership,
    split_roles,
    training_ids,
)

SIZES = {"target_member": 50, "target_nonmember": 40, "shadow_member": 30, "shadow_nonmember": 20}


@pytest.fixture(scope="module")
def digits():
    return load_source({"name": "digits"})


def test_digits_are_real_images(digits):
    assert len(digits) == 1797
    img = digits.image(0, 16)
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    assert img.max() > 200 and img.min() == 0  # strokes on a black background


def test_split_is_disjoint_sized_and_deterministic(digits):
    a = split_roles(len(digits), SIZES, 7, "digits", digits.labels)
    b = split_roles(len(digits), SIZES, 7, "digits", digits.labels)
    c = split_roles(len(digits), SIZES, 8, "digits", digits.labels)
    assert a.equals(b)
    assert manifest_hash(a) == manifest_hash(b) != manifest_hash(c)
    assert a["source_index"].n_unique() == a.height == sum(SIZES.values())
    counts = dict(a.group_by("role").len().iter_rows())
    assert counts == SIZES
    # labels are the dataset's, not reassigned
    np.testing.assert_array_equal(
        a["label"].to_numpy(), digits.labels[a["source_index"].to_numpy()]
    )


def test_split_refuses_bad_sizes(digits):
    with pytest.raises(ValueError, match="only 1797"):
        split_roles(len(digits), {r: 500 for r in ROLES}, 0, "digits", digits.labels)
    with pytest.raises(ValueError, match="must be >= 1"):
        split_roles(len(digits), {**SIZES, "shadow_member": 0}, 0, "digits", digits.labels)
    with pytest.raises(ValueError, match="unknown roles"):
        split_roles(len(digits), {**SIZES, "train": 3}, 0, "digits", digits.labels)


def test_shadow_membership_halves_the_adversary_pool(digits):
    manifest = split_roles(len(digits), SIZES, 0, "digits", digits.labels)
    m = shadow_membership(manifest, 3, seed=0)
    pool = set(manifest.filter(pl.col("role").str.starts_with("shadow"))["sample_id"])
    assert training_ids("shadow0", manifest, m) == set(
        manifest.filter(pl.col("role") == "shadow_member")["sample_id"]
    )
    for model in ("shadow1", "shadow2"):
        ids = training_ids(model, manifest, m)
        assert ids <= pool and len(ids) == len(pool) // 2
    assert training_ids("shadow1", manifest, m) != training_ids("shadow2", manifest, m)
    assert training_ids("target", manifest, m) == set(
        manifest.filter(pl.col("role") == "target_member")["sample_id"]
    )
    online = shadow_membership(manifest, 2, seed=0, include_targets=True)
    assert online.filter(pl.col("model") == "shadow1").height == manifest.height


def test_shard_round_trip(digits, tmp_path):
    manifest = split_roles(len(digits), SIZES, 0, "digits", digits.labels)
    rows = manifest.filter(pl.col("role") == "shadow_nonmember").sort("sample_id")
    path = tmp_path / "shadow_nonmember-000000.tar"
    write_tar_shard(rows, digits, 16, path)
    samples = list(iter_shards([path]))
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


def test_shadow_classes_shift_the_adversary_distribution(digits):
    m = split_roles(len(digits), SIZES, 0, "digits", digits.labels, shadow_classes=[0, 1, 2])
    shadow = m.filter(pl.col("role").str.starts_with("shadow"))
    assert set(shadow["label"]) == {0, 1, 2}
    assert len(set(m.filter(pl.col("role") == "target_member")["label"])) == 10
    assert m["source_index"].n_unique() == m.height
    with pytest.raises(ValueError, match="classes \\[0\\]"):
        split_roles(
            len(digits),
            {**SIZES, "shadow_member": 300},
            0,
            "digits",
            digits.labels,
            shadow_classes=[0],
        )


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
    manifest = assigned_roles(read_assignment(csv), src.keys, "folder", src.labels)
    assert dict(manifest.group_by("role").len().iter_rows()) == dict.fromkeys(ROLES, 2)
    member = manifest.filter(pl.col("role") == "target_member").sort("source_index")
    assert [src.keys[i] for i in member["source_index"]] == ["cat/0.png", "dog/0.png"]
    assert member["label"].to_list() == [0, 1]
    # The config takes role sizes from the file, before any job runs.
    cfg = {
        "defaults": {
            "dataset": {"name": "image_folder", "path": str(root), "img_size": 8},
            "model": {"patch_size": 4, "encoder_overrides": {"embed_dim": 32}},
            "pretrain": {"batch_size": 2, "warmup_epochs": 1},
            "adapt": {"batch_size": 2, "warmup_epochs": 1},
        },
        "experiments": {"audit": {"split": {"assignment": str(csv)}}},
    }
    assert resolve_experiments(cfg)["audit"]["split"]["target_member"] == 2
    bad = tmp_path / "bad.csv"
    pl.DataFrame({"key": ["cat/0.png", "cat/9.png"], "role": ["target_member"] * 2}).write_csv(bad)
    with pytest.raises(ValueError, match="not in dataset"):
        assigned_roles(read_assignment(bad), src.keys, "folder", src.labels)
    pl.DataFrame({"key": ["cat/0.png"], "role": ["training"]}).write_csv(bad)
    with pytest.raises(ValueError, match="unknown roles \\['training'\\]"):
        read_assignment(bad)
