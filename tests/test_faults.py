"""Faults made real (a full filesystem, damaged resume and weight files): loud and harmless."""

import errno
import gc
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch
from safetensors.torch import save_file

from mimia.data.shards import write_tar_shard
from mimia.data.sources import load_source
from mimia.data.splits import split_roles
from mimia.extract import extract_shard
from mimia.models import build_model
from mimia.models.checkpoint import load_model, read_weights, save_model
from mimia.provenance import write_parquet
from mimia.storage import NoSpaceError, atomic_path
from mimia.training import TrainConfig, train_mim

CFG = TrainConfig.from_section(
    {"epochs": 3, "batch_size": 8, "blr": 1e-2, "warmup_epochs": 1, "checkpoint_every": 1}, seed=1
)


def _images(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)


def _train(spec, resume=None, fingerprint="f", **kw):
    torch.manual_seed(0)
    model = build_model(spec)
    history = train_mim(model, _images(), CFG, resume_path=resume, fingerprint=fingerprint, **kw)
    return model, history


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


# -- a full filesystem -------------------------------------------------------------------------
@pytest.fixture
def full_disk(tmp_path):
    """A folder on a 1 MiB tmpfs filled to the last byte: every write there hits ENOSPC."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    run = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if run.returncode:
        pytest.skip(f"mounting a tmpfs is not permitted here: {run.stderr.strip()}")
    try:
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield mnt
    finally:
        gc.collect()  # a failed writer's file object may still hold the mount
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            # pytest keeps the exception (and its frames' open files) alive: detach lazily.
            subprocess.run(["umount", "-l", str(mnt)], check=True)


def _assert_no_space(err, final: Path) -> None:
    msg = str(err.value)
    assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC
    assert msg.startswith(f"no space left on device while writing {final} (")
    assert msg.count(final.name) == 1  # not again as the temp file's name
    assert not final.exists()
    assert _leftovers(final.parent) == []


def test_atomic_path_on_a_full_disk_keeps_the_old_file(full_disk):
    final = full_disk / "table.bin"
    with atomic_path(final) as tmp:  # an empty file still fits
        tmp.touch()
    assert final.read_bytes() == b""
    with pytest.raises(NoSpaceError) as err, atomic_path(final) as tmp:
        tmp.write_bytes(b"x" * 100_000)
    assert (
        str(err.value) == f"no space left on device while writing {final} (No space left on device)"
    )
    assert final.read_bytes() == b""  # the previous version is untouched
    assert _leftovers(full_disk) == []


def test_atomic_path_passes_other_errors_through(tmp_path):
    final = tmp_path / "out.bin"
    with pytest.raises(KeyError, match="boom"), atomic_path(final) as tmp:
        tmp.write_bytes(b"partial")
        raise KeyError("boom")
    assert not final.exists() and _leftovers(tmp_path) == []
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"whole")
    assert final.read_bytes() == b"whole" and _leftovers(tmp_path) == []


def test_save_model_on_a_full_disk(tiny_spec, full_disk):
    final = full_disk / "models" / "model.safetensors"
    with pytest.raises(NoSpaceError) as err:
        save_model(build_model(tiny_spec), final)
    _assert_no_space(err, final)
    assert not final.with_suffix(".json").exists()


def test_write_parquet_on_a_full_disk(full_disk):
    final = full_disk / "errors.parquet"
    table = pa.table({"x": np.random.default_rng(0).random(300_000)})
    with pytest.raises(NoSpaceError) as err:
        write_parquet(table, final, {"seed": "0"})
    _assert_no_space(err, final)


def test_experiment_metrics_and_figures_on_a_full_disk(tmp_path, full_disk):
    """metrics.json, the summary tables and every figure are written atomically."""
    from mimia.metrics import evaluate, roc_frame
    from mimia.report.figures import roc_figure
    from mimia.report.tables import experiment_metrics, summary

    labels = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    scores = np.random.default_rng(0).normal(size=100) + labels
    record = {"decoder": "shadow", "attack": "lira", **evaluate(labels, scores, n_bootstrap=10)}
    record["manifest_sha256"] = "f" * 64
    # big enough that a half-written file would hit the full disk (not just the empty file)
    record["padding"] = ["x" * 100] * 2000
    (tmp_path / "lira.json").write_text(json.dumps(record))
    final = full_disk / "metrics.json"
    with pytest.raises(NoSpaceError) as err:
        experiment_metrics("base", 0, None, [tmp_path / "lira.json"], final, tmp_path / "m.pq")
    _assert_no_space(err, final)
    experiment_metrics(
        "base", 0, None, [tmp_path / "lira.json"], tmp_path / "m.json", tmp_path / "m.pq"
    )
    for name in ("summary.csv", "summary.md"):
        outs = {"summary.csv": tmp_path / "s.csv", "summary.md": tmp_path / "s.md"}
        outs[name] = full_disk / name
        with pytest.raises(NoSpaceError) as err:
            summary([tmp_path / "m.pq"], tmp_path / "s.pq", outs["summary.csv"], outs["summary.md"])
        _assert_no_space(err, full_disk / name)
    final = full_disk / "roc.png"
    with pytest.raises(NoSpaceError) as err:
        roc_figure(
            {("shadow", "lira"): roc_frame(labels, scores)}, {("shadow", "lira"): 0.7}, final
        )
    _assert_no_space(err, final)


@pytest.fixture(scope="module")
def digits_rows():
    src = load_source({"name": "digits"})
    sizes = dict.fromkeys(
        ("target_member", "target_nonmember", "shadow_member", "shadow_nonmember"), 40
    )
    return src, split_roles(src.keys, src.content_hashes(), src.labels, sizes, 0, "digits")


def test_write_tar_shard_on_a_full_disk(digits_rows, full_disk):
    src, manifest = digits_rows
    final = full_disk / "shards" / "target_member-000000.tar"
    with pytest.raises(NoSpaceError) as err:
        write_tar_shard(manifest.filter(pl.col("role") == "target_member"), src, 16, final)
    _assert_no_space(err, final)


def test_extract_shard_on_a_full_disk(digits_rows, tiny_spec, tmp_path, full_disk):
    src, manifest = digits_rows
    shard = tmp_path / "target_member-000000.tar"
    write_tar_shard(manifest.filter(pl.col("role") == "target_member"), src, 16, shard)
    torch.manual_seed(0)
    final = full_disk / "errors" / "target-released-000000.parquet"
    with pytest.raises(NoSpaceError) as err:
        extract_shard(
            build_model(tiny_spec).eval(),
            shard,
            final,
            model_name="target",
            decoder="released",
            seed=0,
            mask_ratios=[0.75],
            num_masks=2,
            batch_size=16,
            num_workers=0,
        )
    _assert_no_space(err, final)


def test_training_checkpoint_on_a_full_disk(tiny_spec, full_disk):
    # torch's zip writer hides the errno ("unexpected pos ..."): still reported as disk full.
    final = full_disk / "target" / "resume.pt"
    with pytest.raises(NoSpaceError) as err:
        _train(tiny_spec, resume=final)
    _assert_no_space(err, final)
    assert "unexpected pos" in str(err.value) and "bytes left on its filesystem" in str(err.value)


# -- damaged resume files ------------------------------------------------------------------------
class MakesADirectory:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _truncated(path, spec):
    _train(spec, resume=path, stop_after_epoch=0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "central directory"


def _random_bytes(path, spec):
    path.write_bytes(random.Random(0).randbytes(5000))
    return "UnpicklingError"


def _code_executing(path, spec):
    torch.save({"model": {}, "epoch": MakesADirectory(path.parent / "pwned")}, path)
    return "GLOBAL posix.mkdir"


def _official_mae_checkpoint(path, spec):
    torch.save({"model": build_model(spec).state_dict(), "epoch": 3}, path)
    return "not a mimia resume file"


def _other_architecture(path, spec):
    from dataclasses import replace

    shallow = replace(spec, encoder_overrides={**spec.encoder_overrides, "depth": 1})
    _train(shallow, resume=path, stop_after_epoch=0)  # same fingerprint, other model
    return "other parameter names"


@pytest.mark.parametrize(
    "damage",
    [_truncated, _random_bytes, _code_executing, _official_mae_checkpoint, _other_architecture],
)
def test_unusable_resume_file_is_set_aside_and_training_starts_over(
    tiny_spec, tmp_path, capsys, damage
):
    reference, ref_history = _train(tiny_spec)
    resume = tmp_path / "target" / "resume.pt"
    resume.parent.mkdir()
    why = damage(resume, tiny_spec)
    bad = resume.read_bytes()
    capsys.readouterr()
    model, history = _train(tiny_spec, resume=resume)
    log = capsys.readouterr().err
    aside = resume.with_name("resume.pt.corrupt-1")
    assert f"resume file {resume} is unusable (" in log and why in log
    assert f"moved it to {aside} and starting from epoch 0" in log
    assert "weights_only` set to `False`" not in log  # torch's advice to run the file's code
    assert aside.read_bytes() == bad
    assert not (resume.parent / "pwned").exists()
    # A fresh start: the same run as without any resume file.
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert [h["loss"] for h in history] == [h["loss"] for h in ref_history]
    for (name, a), b in zip(
        reference.state_dict().items(), model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    # ... whose own resume file is good again; the next bad one goes beside the first.
    assert torch.load(resume, weights_only=True)["epoch"] == 2
    resume.write_bytes(b"")
    _train(tiny_spec, resume=resume)
    assert resume.with_name("resume.pt.corrupt-2").read_bytes() == b""
    assert aside.read_bytes() == bad


def test_resume_file_of_another_config_is_ignored_not_moved(tiny_spec, tmp_path, capsys):
    resume = tmp_path / "resume.pt"
    _train(tiny_spec, resume=resume, fingerprint="old", stop_after_epoch=0)
    capsys.readouterr()
    _, history = _train(tiny_spec, resume=resume, fingerprint="new")
    assert f"ignoring {resume}: made for other data or config" in capsys.readouterr().err
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert not list(tmp_path.glob("*.corrupt-*"))


# -- damaged weight files ------------------------------------------------------------------------
def test_truncated_safetensors_names_the_file(tiny_spec, tmp_path):
    path = tmp_path / "target" / "model.safetensors"
    save_model(build_model(tiny_spec), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=rf"cannot read safetensors file {path} \(") as err:
        load_model(path)
    assert "truncated" in str(err.value) and "incomplete metadata" in str(err.value)
    other = tmp_path / "enc.safetensors"
    save_file({"w": torch.zeros(10)}, other)
    other.write_bytes(other.read_bytes()[:6])
    with pytest.raises(ValueError, match=rf"cannot read safetensors file {other} .*header"):
        read_weights(other)


def test_corrupt_sidecar_names_the_file(tiny_spec, tmp_path):
    path = tmp_path / "model.safetensors"
    save_model(build_model(tiny_spec), path)
    path.with_suffix(".json").write_text('{"spec": {')
    with pytest.raises(ValueError, match=rf"checkpoint sidecar .*{path.with_suffix('.json')} is"):
        load_model(path)


def test_save_model_names_the_file_it_failed_on(tiny_spec, tmp_path, full_disk):
    # Weights fit elsewhere; here neither fits, and the message names the weights file.
    final = full_disk / "model.safetensors"
    with pytest.raises(NoSpaceError, match=r"while writing \S+model\.safetensors \(") as err:
        save_model(build_model(tiny_spec), final)
    assert "model.json" not in str(err.value)
