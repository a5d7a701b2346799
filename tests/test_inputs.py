"""Bad paths and settings refused before any job, and the facts of an imported target taken
only from the checkpoint or from what the user wrote."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mimia.config import (
    RDP_ORDERS,
    model_pretrain,
    rdp_epsilon_floor,
    resolve_experiments,
    results_folder,
)
from mimia.data.sources import load_source, source_fingerprint
from mimia.models import build_model
from mimia.models.checkpoint import import_mae_checkpoint, load_model
from mimia.models.spec import ModelSpec
from mimia.stages import import_target

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile")]
SMALL = {
    "dataset": {"name": "digits", "img_size": 16},
    "split": {k: 40 for k in ("target_member", "target_nonmember", "shadow_member")}
    | {"shadow_nonmember": 40, "shard_size": 20},
    "pretrain": {"batch_size": 20},
    "adapt": {"batch_size": 20},
}


def _dry_run(workdir: Path, config: dict, *args: str) -> subprocess.CompletedProcess:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    config_file = str(workdir / "config.yaml")
    return subprocess.run(
        [
            *SNAKEMAKE,
            "--directory",
            str(workdir),
            "--configfile",
            config_file,
            "--cores",
            "1",
            *args,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )


def _png(path: Path, value: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


# -- the results folder -------------------------------------------------------------------------
def test_results_that_is_empty_the_root_or_a_file_is_refused_before_any_job(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.chdir(tmp_path)  # relative paths are the workflow's working directory's
    cases = {
        "": "results: '' is not a folder",
        "/": "results: '/' is the filesystem root",
        "a-file": "results: 'a-file' is an existing file, not a folder",
    }
    for value, message in cases.items():
        with pytest.raises(ValueError, match=message):
            results_folder(value)
        # For real: a config file's `results: ""` would plan every output under `/`.
        config = {"results": value, "experiments": {"x": SMALL}}
        run = _dry_run(tmp_path, config, "--dry-run")
        assert run.returncode != 0
        out = run.stdout + run.stderr  # Snakemake 9 prints a workflow's error on stdout
        assert message in out
        assert "Traceback" not in out
        made = sorted(p.name for p in tmp_path.iterdir() if p.name != ".snakemake")
        assert made == ["a-file", "config.yaml"]
    assert results_folder("out/") == "out" and results_folder("out") == "out"


# -- image sources ------------------------------------------------------------------------------
def test_symlink_loops_and_dangling_links_in_an_image_folder_are_skipped_with_a_warning(
    tmp_path, capfd
):
    root = tmp_path / "images"
    for i in range(3):
        _png(root / "a" / f"{i}.png", i)
    (root / "a" / "x1.png").symlink_to("x2.png")  # a loop of two links
    (root / "a" / "x2.png").symlink_to("x1.png")
    (root / "self").symlink_to("self")  # a folder link that loops on itself
    (root / "a" / "gone.png").symlink_to("missing.png")
    (root / "a" / "up").symlink_to("..")  # a cycle through a real folder: walked once
    folder = {"name": "image_folder", "path": str(root)}
    source = load_source(folder)
    assert source.keys == ["a/0.png", "a/1.png", "a/2.png"]
    err = capfd.readouterr().err.splitlines()
    assert f"image folder {root}: skipping a/x1.png: a symbolic link loop" in err
    assert f"image folder {root}: skipping self: a symbolic link loop" in err
    assert f"image folder {root}: skipping a/gone.png: a dangling link" in err
    assert "Traceback" not in "\n".join(err)
    assert source_fingerprint(folder) == source_fingerprint(folder)


def test_a_missing_torchvision_dataset_is_refused_at_start(tmp_path):
    cfg = {"name": "cifar10", "path": str(tmp_path / "nowhere")}
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py does not exist"):
        source_fingerprint(cfg)
    source_fingerprint({**cfg, "download": True})  # the split job downloads it
    run = _dry_run(tmp_path, {"experiments": {"x": {**SMALL, "dataset": cfg}}}, "--dry-run")
    assert run.returncode != 0
    assert "cifar-10-batches-py does not exist" in run.stdout + run.stderr
    assert not (tmp_path / "results").exists()


def test_a_touched_or_copied_image_folder_keeps_its_fingerprint(tmp_path):
    root = tmp_path / "images"
    for i in range(4):
        _png(root / f"c{i % 2}" / f"{i}.png", i)
    base = source_fingerprint({"name": "image_folder", "path": str(root)})
    for path in root.rglob("*.png"):  # touch: same bytes, new times
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert source_fingerprint({"name": "image_folder", "path": str(root)}) == base
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, copy_function=shutil.copy)  # cp -r: new files, new times
    assert source_fingerprint({"name": "image_folder", "path": str(copy)}) == base
    # Another image of the same size is a change.
    one = copy / "c0" / "0.png"
    size = one.stat().st_size
    one.write_bytes(one.read_bytes()[:-1] + bytes([one.read_bytes()[-1] ^ 1]))
    assert one.stat().st_size == size
    assert source_fingerprint({"name": "image_folder", "path": str(copy)}) != base
    # The digest cache: an unchanged file's digest is read from it, not from the file.
    cache = tmp_path / "digests.json"
    folder = {"name": "image_folder", "path": str(root)}
    assert source_fingerprint(folder, cache) == base
    entries = json.loads(cache.read_text())
    assert sorted(entries) == sorted(str(p.resolve()) for p in root.rglob("*.png"))
    key = str((root / "c1" / "1.png").resolve())
    entries[key][1] = "0:" + "0" * 64
    cache.write_text(json.dumps(entries))
    assert source_fingerprint(folder, cache) != base  # proves the cached digest was used
    os.utime(root / "c1" / "1.png")  # a new mtime: read again
    assert source_fingerprint(folder, cache) == base


def test_a_touched_image_folder_reruns_nothing_in_the_workflow(tmp_path):
    root = tmp_path / "images"
    for i in range(16):
        _png(root / f"c{i % 2}" / f"{i}.png", i)
    sizes = {k: 4 for k in ("target_member", "target_nonmember", "shadow_member")}
    exp = {
        **SMALL,
        "dataset": {"name": "image_folder", "path": str(root), "img_size": 8},
        "split": {**sizes, "shadow_nonmember": 4, "shard_size": 4},
        "pretrain": {"batch_size": 4},
        "adapt": {"batch_size": 4},
    }
    config = {"experiments": {"x": exp}}
    manifest = "results/x/data/manifest.parquet"
    run = _dry_run(tmp_path, config, manifest)
    assert run.returncode == 0, run.stderr[-3000:]
    for path in root.rglob("*.png"):
        os.utime(path)
    run = _dry_run(tmp_path, config, "--dry-run", manifest)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Nothing to be done" in run.stdout + run.stderr
    _png(root / "c0" / "0.png", 99)  # a replaced image still reruns the split
    run = _dry_run(tmp_path, config, "--dry-run", manifest)
    assert "rule manifest" in run.stdout, run.stdout[-2000:]


# -- settings checked when the config is read ---------------------------------------------------
def _resolve(**exp) -> dict:
    return resolve_experiments({"experiments": {"x": {**SMALL, **exp}}})["x"]


def test_a_head_count_that_does_not_divide_the_width_is_a_config_error_naming_the_key():
    model = {"encoder_overrides": {"embed_dim": 64, "depth": 1, "num_heads": 5}}
    with pytest.raises(ValueError, match=r"model.encoder_overrides.num_heads=5 does not divide"):
        _resolve(model=model)
    with pytest.raises(ValueError, match=r"model.decoder_num_heads=3 does not divide"):
        _resolve(model={"decoder_embed_dim": 32, "decoder_num_heads": 3})
    with pytest.raises(ValueError, match=r"num_heads=7 does not divide .*embed_dim=192"):
        ModelSpec(encoder_overrides={"num_heads": 7})  # the API too, not timm's AssertionError


def test_shadow_pretrain_whole_number_floats_become_integers():
    exp = _resolve(
        shadow={"knows_defense": False, "pretrain": {"epochs": 20.0, "warmup_epochs": 2.0}}
    )
    assert exp["shadow"]["pretrain"] == {"epochs": 20, "warmup_epochs": 2}
    train = model_pretrain(exp, "shadow0")
    assert type(train["epochs"]) is int and list(range(train["epochs"]))[-1] == 19
    with pytest.raises(ValueError, match=r"shadow.pretrain: epochs: 20.5 is not of type"):
        _resolve(shadow={"knows_defense": False, "pretrain": {"epochs": 20.5}})


def test_dp_delta_not_below_one_over_n_and_an_unreachable_target_epsilon_are_refused():
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    with pytest.raises(ValueError, match=r"pretrain.dp.delta=0.025 is not below 1/N = 1/40"):
        _resolve(pretrain={"batch_size": 20, "dp": {"noise_multiplier": 1.0, "delta": 0.025}})
    _resolve(pretrain={"batch_size": 20, "dp": {"noise_multiplier": 1.0, "delta": 0.02}})
    # The floor is the accountant's own: Opacus' conversion at zero Renyi divergence (infinite
    # noise) at its own orders, so get_noise_multiplier cannot reach below it.
    assert list(RDP_ORDERS) == RDPAccountant.DEFAULT_ALPHAS
    for delta in (1e-5, 1e-3):
        eps, _ = get_privacy_spent(orders=RDP_ORDERS, rdp=[0.0] * len(RDP_ORDERS), delta=delta)
        assert rdp_epsilon_floor(delta) == pytest.approx(eps, rel=1e-12)
    assert 0.10 < rdp_epsilon_floor(1e-5) < 0.11
    with pytest.raises(ValueError, match=r"pretrain.dp.target_epsilon=0.1 is too small for the"):
        _resolve(pretrain={"batch_size": 20, "dp": {"target_epsilon": 0.1}})
    _resolve(pretrain={"batch_size": 20, "dp": {"target_epsilon": 0.2}})


# -- facts an imported checkpoint cannot tell ---------------------------------------------------
ENCODER = {"embed_dim": 32, "depth": 1, "num_heads": 2}
ARCH = {
    "encoder_overrides": ENCODER,
    "patch_size": 4,
    "decoder_embed_dim": 32,
    "decoder_depth": 1,
    "decoder_num_heads": 2,
}


def _official_release(path: Path, spec: ModelSpec, args: dict | None = None) -> None:
    torch.manual_seed(0)
    model = build_model(spec)
    sd = {}
    for k, v in model.state_dict().items():
        sd[k.removeprefix("encoder.").removeprefix("decoder.")] = v.clone()
    obj = {"model": sd}
    if args is not None:
        obj["args"] = argparse.Namespace(**args)
    torch.save(obj, path)


def test_a_timm_target_without_written_heads_and_eps_is_refused_before_any_job():
    # The ViT-B: width and depth written, heads left to the default encoder's table.
    model = {"encoder_overrides": {"embed_dim": 768, "depth": 12}, "patch_size": 4}
    target = {"checkpoint": "vit_b.safetensors", "format": "timm"}
    with pytest.raises(ValueError) as err:
        _resolve(model=model, target=target, decoder=["shadow", "adapted"])
    msg = str(err.value)
    assert "does not record model.encoder_overrides.num_heads, model.norm_eps" in msg
    assert "encoder name's table" in msg
    model["encoder_overrides"]["num_heads"] = 12
    exp = _resolve(model={**model, "norm_eps": 1e-6}, target=target, decoder=["adapted"])
    assert exp["target"]["stated"] == ["norm_eps", "num_heads"]


def _stage(exp: dict, checkpoint: Path, out: Path) -> dict:
    from mimia.config import model_spec

    import_target(
        checkpoint=checkpoint,
        weights=out,
        sidecar=out.with_suffix(".json"),
        format=exp["target"]["format"],
        spec=model_spec(exp).to_dict(),
        needs_decoder="released" in exp["decoder"],
        stated=exp["target"].get("stated"),
    )
    return json.loads(out.with_suffix(".json").read_text())["info"]["imported"]


def test_an_mae_release_imports_only_what_the_user_wrote_and_logs_every_source(tmp_path, capfd):
    ckpt = tmp_path / "release.pth"
    _official_release(ckpt, ModelSpec(img_size=16, **ARCH))
    target = {"checkpoint": str(ckpt), "format": "mae"}
    # Heads left to the encoder name's table (vit_tiny: 3) do not divide the width: refused
    # when the config is read, saying they were not written.
    with pytest.raises(ValueError, match=r"num_heads=3 does not divide .* \(num_heads not written"):
        _resolve(
            model=ARCH | {"encoder_overrides": {"embed_dim": 32, "depth": 1}},
            target=target,
            decoder=["released"],
        )
    # Eps and norm_pix_loss come from the schema's defaults here: the import job refuses,
    # naming them and only them.
    exp = _resolve(model=ARCH, target=target, decoder=["released"])
    with pytest.raises(ValueError) as err:
        _stage(exp, ckpt, tmp_path / "t1" / "model.safetensors")
    msg = str(err.value)
    for key in ("model.norm_eps", "model.norm_pix_loss"):
        assert key in msg
    assert "num_heads" not in msg  # written in ARCH
    assert not (tmp_path / "t1").exists()
    written = ARCH | {"norm_eps": 1e-6, "norm_pix_loss": False}
    exp = _resolve(model=written, target=target, decoder=["released"])
    capfd.readouterr()
    info = _stage(exp, ckpt, tmp_path / "t2" / "model.safetensors")
    sources = info["spec_sources"]
    assert sources["num_heads"] == "user's config (model.encoder_overrides.num_heads)"
    assert sources["norm_eps"] == "user's config (model.norm_eps)"
    assert sources["depth"] == "weights blocks.N"
    assert sources["mean"] == "default (model.mean not written)"
    # What the weights do not record, for the plausibility check (mimia.models.plausibility).
    assert info["unrecorded"] == [
        "decoder_num_heads",
        "mask_patch_size",
        "mean",
        "norm_eps",
        "norm_pix_loss",
        "num_heads",
        "std",
    ]
    log = capfd.readouterr().err
    assert "model.norm_eps" in log and "<- user's config (model.norm_eps)" in log
    assert "given (config)" not in log
    # A training checkpoint's args say norm_pix_loss: it need not be written.
    ckpt2 = tmp_path / "checkpoint-1.pth"
    _official_release(ckpt2, ModelSpec(img_size=16, **ARCH), {"norm_pix_loss": False})
    exp = _resolve(
        model=ARCH | {"norm_eps": 1e-6},
        target=target | {"checkpoint": str(ckpt2)},
        decoder=["released"],
    )
    info = _stage(exp, ckpt2, tmp_path / "t3" / "model.safetensors")
    assert info["spec_sources"]["norm_pix_loss"] == "args.norm_pix_loss"
    assert "norm_pix_loss" not in info["unrecorded"] and "num_heads" in info["unrecorded"]


def test_checkpoint_args_of_the_wrong_type_are_refused(tmp_path):
    spec = ModelSpec(img_size=16, **ARCH)
    ckpt = tmp_path / "checkpoint-1.pth"
    _official_release(ckpt, spec, {"norm_pix_loss": "False", "input_size": 16})
    given = {"num_heads": 2, "decoder_num_heads": 2, "norm_eps": 1e-6}
    with pytest.raises(ValueError, match=r"args.norm_pix_loss is 'False' \(str\), expected a bool"):
        import_mae_checkpoint(ckpt, **given)
    _official_release(ckpt, spec, {"norm_pix_loss": False, "input_size": 16.0})
    with pytest.raises(ValueError, match=r"args.input_size is 16.0 \(float\), expected a int"):
        import_mae_checkpoint(ckpt, **given)
    _official_release(ckpt, spec, {"norm_pix_loss": True, "input_size": 16})
    model, _ = import_mae_checkpoint(ckpt, **given)
    assert model.spec.norm_pix_loss is True


def test_encoder_only_modes_ignore_a_checkpoint_decoder_unlike_the_config(tmp_path):
    ckpt = tmp_path / "release.pth"
    released = ModelSpec(img_size=16, **(ARCH | {"decoder_embed_dim": 48, "decoder_depth": 2}))
    _official_release(ckpt, released)
    exp = _resolve(
        model=ARCH | {"norm_eps": 1e-6},
        target={"checkpoint": str(ckpt), "format": "mae"},
        decoder=["shadow", "adapted"],
    )
    out = tmp_path / "t" / "model.safetensors"
    info = _stage(exp, ckpt, out)
    assert info["decoder_ignored"] is True and info["decoder_released"] is False
    model = load_model(out)
    assert model.spec.decoder_embed_dim == 32  # the config's, freshly initialised
    torch.manual_seed(0)
    original = build_model(released)
    for k, v in original.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v), k
    # With the released decoder in use, the same checkpoint is a mismatch.
    exp["decoder"] = ["released"]
    exp["model"]["norm_pix_loss"] = False
    exp["target"]["stated"] = exp["target"]["stated"] + ["norm_pix_loss"]
    with pytest.raises(ValueError, match=r"model.decoder_embed_dim: checkpoint 48"):
        _stage(exp, ckpt, tmp_path / "t2" / "model.safetensors")
