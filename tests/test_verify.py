"""``mimia verify`` on a real, small results folder: untouched, tampered, replaced, missing."""

import inspect
import subprocess
import sys
import tarfile
from pathlib import Path

import polars as pl
import pytest
import torch

import mimia
from mimia.data.prepare import write_manifest, write_membership, write_shard
from mimia.data.splits import ROLES, manifest_hash
from mimia.extract import extract_shard
from mimia.models import build_model
from mimia.models.checkpoint import save_model
from mimia.provenance import file_sha256, provenance, read_metadata, write_parquet

EXP = "results/exp"
DATASET = {"name": "digits", "img_size": 16}
SPLIT = {**dict.fromkeys(ROLES, 8), "shard_size": 8}


def shard_path(role):
    return f"{EXP}/data/shards/{role}-000000.tar"


def build_results(root: Path, spec) -> dict[str, Path]:
    """What the workflow writes, by the real functions, with the hashes its stages record."""
    exp = root / EXP
    manifest = exp / "data/manifest.parquet"
    df = write_manifest(dataset=DATASET, split=SPLIT, seed=0, manifest=manifest)
    digest = manifest_hash(df)
    for model in ("shadow0", "shadow1"):
        write_membership(
            manifest=manifest,
            model=model,
            online=False,
            seed=0,
            membership=exp / f"data/membership/{model}.parquet",
        )
    for role in ROLES:
        write_shard(
            dataset=DATASET,
            shard_size=8,
            manifest=manifest,
            role=role,
            index=0,
            shard=root / shard_path(role),
        )
    torch.manual_seed(0)
    target = root / EXP / "models/target/model.safetensors"
    save_model(build_model(spec), target, {"model": "target", "manifest_sha256": digest})
    adapted = root / EXP / "models/target-adapted/model.safetensors"
    save_model(
        build_model(spec),
        adapted,
        {
            "model": "target-adapted",
            "manifest_sha256": digest,
            "target_sha256": file_sha256(target),
        },
    )
    model = build_model(spec).eval()
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(target)))
    tables = {}
    for role in ("target_member", "target_nonmember"):
        out = root / EXP / f"errors/target/released/{role}-000000.parquet"
        meta = provenance(
            seed=0,
            manifest_sha256=digest,
            shard_sha256=file_sha256(root / shard_path(role)),
            shard_file=shard_path(role),
            checkpoint_sha256={"model": file_sha256(target)},
            checkpoint_files={"model": f"{EXP}/models/target/model.safetensors"},
            model="target",
            decoder="released",
            mask_ratios=[0.75],
            num_masks=2,
        )
        kwargs = dict(
            model_name="target",
            decoder="released",
            seed=0,
            mask_ratios=[0.75],
            num_masks=2,
            batch_size=8,
            num_workers=0,
            metadata=meta,
        )
        # Error tables are losing their membership columns; pass the lookup while it exists.
        if "is_member" in inspect.signature(extract_shard).parameters:
            kwargs["is_member"] = lambda s: True
        extract_shard(model, root / shard_path(role), out, **kwargs)
        tables[f"{EXP}/errors/target/released/{role}-000000.parquet"] = out
    write_parquet(
        pl.concat([pl.read_parquet(p) for p in tables.values()]),
        exp / "errors.parquet",
        provenance(
            seed=0,
            manifest_sha256=digest,
            inputs_sha256={name: file_sha256(p) for name, p in tables.items()},
        ),
    )
    return {"manifest": manifest, "target": target, "adapted": adapted, **tables}


def mimia_verify(*args, cwd):
    env = {"PYTHONPATH": str(Path(mimia.__file__).parents[1]), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "mimia.cli", "verify", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    return out.returncode, out.stdout + out.stderr


def lines_of(output, status):
    return [ln for ln in output.splitlines() if ln.startswith(status)]


@pytest.fixture
def results(tmp_path, tiny_spec):
    return tmp_path, build_results(tmp_path, tiny_spec)


def test_untouched_results_verify(results):
    root, _ = results
    rc, out = mimia_verify(EXP, cwd=root)
    assert rc == 0, out
    ok = lines_of(out, "OK")
    for name in [*(shard_path(r) for r in ROLES), f"{EXP}/models/target/model.safetensors"]:
        assert any(ln.split()[1].rstrip(":") == name for ln in ok), (name, out)
    shard = next(ln for ln in ok if shard_path("target_member") in ln)
    assert "matches 1 records" in shard and "8 samples agree with the manifest" in shard
    manifest = next(ln for ln in ok if "data/manifest.parquet" in ln)
    # Recorded by two membership tables, two sidecars, two error tables, errors.parquet.
    assert "matches 7 records" in manifest
    assert not lines_of(out, "MISMATCH")
    # From elsewhere: paths resolve against the experiment folder's grandparent.
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    rc, out = mimia_verify(root / EXP, cwd=elsewhere)
    assert rc == 0, out


def test_a_tampered_shard_is_named_with_its_recorder(results):
    root, _ = results
    shard = root / shard_path("target_member")
    with tarfile.open(shard) as tar:
        png = next(m for m in tar if m.name.endswith(".png"))
    data = bytearray(shard.read_bytes())
    data[png.offset_data + png.size // 2] ^= 0xFF  # a byte of the first image
    shard.write_bytes(bytes(data))
    rc, out = mimia_verify(EXP, cwd=root)
    assert rc == 1, out
    [line] = lines_of(out, "MISMATCH")
    assert line.startswith(f"MISMATCH   {shard_path('target_member')}: shard_sha256 recorded ")
    assert f"by {EXP}/errors/target/released/target_member-000000.parquet" in line
    assert f"found {file_sha256(shard)}" in line


def test_a_replaced_checkpoint_is_named(results, tiny_spec):
    root, files = results
    recorded = file_sha256(files["target"])
    torch.manual_seed(1)
    save_model(build_model(tiny_spec), files["target"], {"model": "target"})
    rc, out = mimia_verify(EXP, cwd=root)
    assert rc == 1, out
    bad = lines_of(out, "MISMATCH")
    [ckpt] = [ln for ln in bad if ln.split()[1] == f"{EXP}/models/target/model.safetensors:"]
    assert ckpt.count(f"checkpoint_sha256['model'] recorded {recorded}") == 2
    assert f"found {file_sha256(files['target'])}" in ckpt
    # The adapted decoder recorded the target it was fitted on: that checkpoint is gone.
    [adapted] = [ln for ln in bad if "target-adapted/model.json" in ln]
    assert f"target_sha256 recorded {recorded}, but no checkpoint" in adapted


def test_an_edited_manifest_is_a_mismatch(results):
    root, files = results
    meta = read_metadata(files["manifest"])
    df = pl.read_parquet(files["manifest"])
    # Swap the roles of one member and one non-member, keep the recorded metadata.
    a = df.filter(pl.col("role") == "target_member")["sample_id"][0]
    b = df.filter(pl.col("role") == "target_nonmember")["sample_id"][0]
    swapped = df.with_columns(
        role=pl.when(pl.col("sample_id") == a)
        .then(pl.lit("target_nonmember"))
        .when(pl.col("sample_id") == b)
        .then(pl.lit("target_member"))
        .otherwise("role")
    )
    write_parquet(swapped, files["manifest"], meta)
    rc, out = mimia_verify(EXP, cwd=root)
    assert rc == 1, out
    [line] = [ln for ln in lines_of(out, "MISMATCH") if "data/manifest.parquet" in ln]
    assert f"manifest_sha256 recorded {meta['manifest_sha256']} in its own metadata" in line
    assert f"by {EXP}/data/membership/shadow0.parquet" in line
    # The shards still carry the roles the split gave: they disagree with the edited manifest.
    [shard] = [ln for ln in lines_of(out, "MISMATCH") if shard_path("target_member") in ln]
    assert "samples disagree with the manifest" in shard


def test_missing_damaged_or_unreadable_artifacts_exit_2(results):
    root, files = results
    (root / shard_path("target_nonmember")).unlink()
    rc, out = mimia_verify(EXP, cwd=root)
    assert rc == 2, out
    [line] = lines_of(out, "MISSING")
    assert line.startswith(f"MISSING    {shard_path('target_nonmember')}: does not exist")
    assert "target_nonmember-000000.parquet" in line
    # A tar whose second member header is damaged: tarfile alone would read one sample.
    shard = root / shard_path("shadow_member")
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        second = tar.getmembers()[1]
    data[second.offset : second.offset + 8] = b"\xff" * 8
    shard.write_bytes(bytes(data))
    rc, out = mimia_verify(EXP, cwd=root)
    assert rc == 2, out
    [line] = [ln for ln in lines_of(out, "UNREADABLE") if shard_path("shadow_member") in ln]
    assert f"not a readable tar shard (damaged at byte {second.offset}" in line
    data = files["adapted"].read_bytes()
    files["adapted"].write_bytes(data[: len(data) - 100])
    rc, out = mimia_verify(EXP, cwd=root)
    [line] = [ln for ln in lines_of(out, "UNREADABLE") if "safetensors" in ln]
    assert f"{EXP}/models/target-adapted/model.safetensors: not a complete safetensors" in line
    rc, out = mimia_verify("results/nope", cwd=root)
    assert (rc, out.strip()) == (2, "results/nope is not a folder (expected results/<experiment>)")
