"""Every shipped preset dry-runs against a small image folder the test writes: the preset with
a second config file that points its dataset there and shrinks the roles to fit (Snakemake
merges several --configfile), checked for the rules it schedules and the models it trains."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from snakemake.utils import update_config

from mimia.config import model_spec, resolve_experiments

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "config" / "presets"
ROLES = ("target_member", "target_nonmember", "shadow_member", "shadow_nonmember")
ARCHS = {  # timm encoder -> (embed_dim, depth, num_heads) the preset trains
    "vit_tiny_patch16_224": (192, 12, 3),
    "vit_small_patch16_224": (384, 12, 6),
    "vit_base_patch16_224": (768, 12, 12),
}
# preset -> (img_size, patch_size, SimMIM mask patch in pixels)
PAPER = {
    "cifar10.yaml": (32, 4, 8),
    "cifar100.yaml": (32, 4, 8),
    "stl10.yaml": (96, 16, 32),
    "imagenet-subset.yaml": (224, 16, 32),
}
JOB = re.compile(r"^(?:local)?rule (\w+):\n((?:    .*\n)*)", re.M)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``<class>/<image>.png``: 3 classes x 8 images of 8 x 8 pixels."""
    from PIL import Image

    root = tmp_path_factory.mktemp("presets") / "images"
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(8):
            img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.png")
    return root


def _override(folder: Path, preset: dict) -> dict:
    """Point the dataset at the test folder; roles of 4 images; batches that fit them."""
    extra = {
        "results": "out",
        "defaults": {
            "dataset": {"name": "image_folder", "path": str(folder)},
            "split": {**dict.fromkeys(ROLES, 4), "shard_size": 4},
            "pretrain": {"batch_size": 2},
            "adapt": {"batch_size": 2},
        },
    }
    if "members" in preset.get("ablations", {}):
        extra["ablations"] = {"members": {"values": [2, 4]}}
    return extra


def _dry_run(tmp_path: Path, preset: Path, extra: dict) -> tuple[dict, list[tuple[str, dict]]]:
    """The merged config (as Snakemake merges --configfile files) and the scheduled jobs."""
    (tmp_path / "extra.yaml").write_text(yaml.safe_dump(extra))
    cache = tmp_path / "cache"
    cache.mkdir()
    run = subprocess.run(
        [
            sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"),
            "--directory", str(tmp_path), "--cores", "2", "--dry-run", "--cache",
            "--configfile", str(preset), str(tmp_path / "extra.yaml"),
        ],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "SNAKEMAKE_OUTPUT_CACHE": str(cache)},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    jobs = []
    for rule, body in JOB.findall(run.stdout):
        found = re.search(r"^    wildcards: (.*)$", body, re.M)
        pairs = (p.split("=", 1) for p in found.group(1).split(", ")) if found else ()
        jobs.append((rule, dict(pairs)))
    config = yaml.safe_load(preset.read_text())
    update_config(config, extra)
    return config, jobs


def _count(jobs, rule, **wildcards) -> int:
    return sum(r == rule and all(w.get(k) == v for k, v in wildcards.items()) for r, w in jobs)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_preset_dry_runs_the_paper_settings(tmp_path, folder, name):
    preset = PRESETS / name
    raw = yaml.safe_load(preset.read_text())
    config, jobs = _dry_run(tmp_path, preset, _override(folder, raw))
    experiments = resolve_experiments(config)
    img, patch, mask_patch = PAPER[name]
    estimates = dict(re.findall(r"^#@gpu-hours (\S+): ([0-9.]+) ", preset.read_text(), re.M))
    assert sorted(estimates) == sorted(experiments)
    assert len(experiments) == 6
    seen = set()
    for exp_name, exp in experiments.items():
        spec = model_spec(exp)
        assert float(estimates[exp_name]) > 0
        assert (spec.img_size, spec.patch_size, spec.encoder_overrides) == (img, patch, {})
        timm_dims = ARCHS[spec.encoder]
        seen.add((spec.recipe, spec.encoder))
        if spec.recipe == "mae":
            big = spec.encoder == "vit_base_patch16_224"
            decoder = (512, 8, 16) if big else (256, 4, 8)
            assert (spec.decoder_embed_dim, spec.decoder_depth, spec.decoder_num_heads) == decoder
            assert exp["pretrain"]["mask_ratio"] == exp["extract"]["mask_ratios"][0] == 0.75
            assert exp["pretrain"]["blr"] == 1.5e-4 and exp["pretrain"]["warmup_epochs"] == 40
        else:
            assert spec.mask_patch_size == mask_patch and spec.mask_block == 2
            assert exp["pretrain"]["mask_ratio"] == exp["extract"]["mask_ratios"][0] == 0.6
            assert exp["pretrain"]["betas"] == [0.9, 0.999]
        assert exp["pretrain"]["epochs"] == 800 and exp["pretrain"]["augment"]
        assert exp["dataset"]["path"] == str(folder) and timm_dims
        # Every model of the experiment is trained, each decoder mode scored, every attack run.
        models = ["target"] + [f"shadow{i}" for i in range(exp["shadow"]["count"])]
        assert exp["shadow"]["count"] == 4
        for model in models:
            assert _count(jobs, "pretrain", experiment=exp_name, model=model) == 1
        assert _count(jobs, "adapt_decoder", experiment=exp_name) == 1
        for decoder in ("released", "shadow", "adapted"):
            assert (
                _count(jobs, "extract", experiment=exp_name, model="target", decoder=decoder) == 2
            )
            assert _count(jobs, "attack", experiment=exp_name, decoder=decoder) == len(
                exp["attacks"]
            )
        assert _count(jobs, "extract", experiment=exp_name, model="shadow3") == 4
        assert _count(jobs, "manifest", experiment=exp_name) == 1
    assert seen == {(r, e) for r in ("mae", "simmim") for e in ARCHS}


def test_cifar10_cpu_study_dry_runs_its_sweeps(tmp_path, folder):
    preset = PRESETS / "cifar10-cpu-study.yaml"
    raw = yaml.safe_load(preset.read_text())
    config, jobs = _dry_run(tmp_path, preset, _override(folder, raw))
    experiments = resolve_experiments(config)
    base = experiments["cifar10-study"]
    spec = model_spec(base)
    assert (spec.img_size, spec.patch_size, spec.encoder_overrides) == (
        32,
        4,
        {"embed_dim": 96, "depth": 4, "num_heads": 4},
    )
    assert (spec.decoder_embed_dim, spec.decoder_depth) == (64, 2)
    assert base["pretrain"]["epochs"] == 60 and base["shadow"]["count"] == 2
    assert base["extract"] == {"grid_samples": 5, "mask_ratios": [0.75], "num_masks": 8}
    assert sorted(base["attacks"]) == ["lira", "random", "rmia", "threshold"]
    sweeps = {name: spec["values"] for name, spec in config["ablations"].items()}
    assert set(sweeps) == {"epochs", "model_size", "members", "mask_ratio", "shift"}
    ablated = {n: e["ablation"] for n, e in experiments.items() if e.get("ablation")}
    assert len(ablated) == sum(len(v) for v in sweeps.values())
    for name, values in sweeps.items():
        # Each sweep holds the base's own value, so its plot has the base as one point.
        parameter = config["ablations"][name]["parameter"]
        dotted = parameter[0] if isinstance(parameter, list) else parameter
        section, key = dotted.split(".")
        assert base[section][key] in values, name
        assert _count(jobs, "ablation_plot", ablation=name) == 1
    epochs = {n: e["pretrain"]["epochs"] for n, e in experiments.items()}
    assert epochs["cifar10-study__epochs-15"] == 15
    big = model_spec(experiments["cifar10-study__model_size-__embed_dim___128___depth___6_"
                                 "__num_heads___4_"])  # fmt: skip
    assert (big.encoder_overrides["embed_dim"], big.encoder_overrides["depth"]) == (128, 6)
    shift = experiments["cifar10-study__shift-0_1_2_3_4"]["split"]["shadow_classes"]
    assert shift == [0, 1, 2, 3, 4]
    for exp_name, exp in experiments.items():
        # The dry run lists every job (an empty cache); the cache then trains each model
        # once: the experiments equal to the base share its cache keys.
        for model in ("target", "shadow0", "shadow1"):
            assert _count(jobs, "pretrain", experiment=exp_name, model=model) == 1
        assert _count(jobs, "attack", experiment=exp_name) == 4 * len(exp["decoder"])
        for role in ROLES[:2]:
            assert _count(jobs, "extract", experiment=exp_name, model="target", role=role) == len(
                exp["decoder"]
            )
    assert _count(jobs, "adapt_decoder") == 1  # only cifar10-study-decoders adapts
    assert experiments["cifar10-study-decoders"]["decoder"] == ["released", "shadow", "adapted"]


def test_cifar10_paper_regime_dry_runs_long_pre_training(tmp_path, folder):
    preset = PRESETS / "cifar10-paper-regime.yaml"
    config, jobs = _dry_run(tmp_path, preset, _override(folder, {}))
    experiments = resolve_experiments(config)
    # The base is the CIFAR-10 CPU study's, so one cache shares their models.
    study = resolve_experiments(yaml.safe_load((PRESETS / "cifar10-cpu-study.yaml").read_text()))
    regime = resolve_experiments(yaml.safe_load(preset.read_text()))["cifar10-regime"]
    for key in ("seed", "dataset", "split", "model", "pretrain", "shadow", "extract"):
        assert regime[key] == study["cifar10-study"][key], key
    assert experiments["cifar10-regime"]["decoder"] == ["released", "adapted"]
    epochs = {e["ablation"]["value"]: e for e in experiments.values() if e.get("ablation")}
    assert sorted(epochs) == [60, 200, 800]
    assert (
        epochs[800]["pretrain"]["epochs"] == 800 and epochs[800]["pretrain"]["warmup_epochs"] == 5
    )
    for exp_name, exp in experiments.items():
        for model in ("target", "shadow0", "shadow1"):
            assert _count(jobs, "pretrain", experiment=exp_name, model=model) == 1
        assert _count(jobs, "adapt_decoder", experiment=exp_name) == 1
        assert _count(jobs, "attack", experiment=exp_name) == 2 * len(exp["attacks"])
    assert _count(jobs, "ablation_plot", ablation="epochs") == 1


def test_cifar10_references_and_fixed_steps_dry_run(tmp_path, folder):
    """The reference-model count and images per role at a fixed number of optimiser steps."""
    preset = PRESETS / "cifar10-references-steps.yaml"
    roles = ((2, 12), (4, 6))
    steps = [{**{f"split.{r}": n for r in ROLES}, "pretrain.epochs": e} for n, e in roles]
    extra = _override(folder, {}) | {"ablations": {"steps": {"values": steps}}}
    config, jobs = _dry_run(tmp_path, preset, extra)
    experiments = resolve_experiments(config)
    regime = resolve_experiments(
        yaml.safe_load((PRESETS / "cifar10-paper-regime.yaml").read_text())
    )
    mine = resolve_experiments(yaml.safe_load(preset.read_text()))
    assert mine["cifar10-regime"] == regime["cifar10-regime"]
    counts = {n: e["shadow"]["count"] for n, e in experiments.items() if "references" in n}
    assert sorted(counts.values()) == [2, 4, 8]
    # One reference model: the same target and shadow0, the attacks that can be fitted on it.
    m1 = experiments["cifar10-regime-m1"]
    assert m1["shadow"]["count"] == 1 and sorted(m1["attacks"]) == ["lira", "random", "threshold"]
    # Each steps value sets the roles and the epochs together: images x epochs is constant.
    for n, e in roles:
        exp = experiments[f"cifar10-regime__steps-{n}_{e}"]
        assert [exp["split"][r] for r in ROLES] == [n] * 4 and exp["pretrain"]["epochs"] == e
    shipped = yaml.safe_load(preset.read_text())["ablations"]["steps"]["values"]
    assert {v["split.target_member"] * v["pretrain.epochs"] for v in shipped} == {30000}
    for exp_name, exp in experiments.items():
        for model in ["target"] + [f"shadow{i}" for i in range(exp["shadow"]["count"])]:
            assert _count(jobs, "pretrain", experiment=exp_name, model=model) == 1
    for ablation in ("references", "steps"):
        assert _count(jobs, "ablation_plot", ablation=ablation) == 1


def test_digits_references_preset_sweeps_the_reference_count_offline_and_online(tmp_path):
    preset = PRESETS / "digits-references.yaml"
    config, jobs = _dry_run(tmp_path, preset, {"results": "out"})
    experiments = resolve_experiments(config)
    offline = {e["shadow"]["count"]: e for n, e in experiments.items() if "online" not in n}
    online = {e["shadow"]["count"]: e for n, e in experiments.items() if "online" in n}
    assert sorted(offline) == [1, 2, 4, 8, 16] and sorted(online) == [4]
    assert sorted(offline[1]["attacks"]) == ["lira", "threshold"]
    assert not any(e["shadow"]["online"] for e in offline.values())
    assert all(e["shadow"]["online"] for e in online.values())
    assert {e["attacks"]["lira_online"]["mode"] for e in online.values()} == {"online"}
    assert _count(jobs, "pretrain", model="shadow15") == 1  # references-16
    assert _count(jobs, "pretrain", model="shadow7") == 2  # references-8 and -16
    assert _count(jobs, "extract", model="shadow7") == 2 * len(ROLES)
    # shadow3: the two bases (4 each), references 4, 8 and 16, and references_online 4.
    assert _count(jobs, "pretrain", model="shadow3") == 6


def test_shadow_model_i_does_not_depend_on_the_number_of_shadow_models(tmp_path):
    """Reference model i trains on the same images with the same seed and settings whatever
    ``shadow.count`` is, so the sweep's cache trains each model once."""
    import polars as pl

    from mimia.config import model_pretrain
    from mimia.data.prepare import write_manifest, write_membership

    preset = yaml.safe_load((PRESETS / "digits-references.yaml").read_text())
    experiments = resolve_experiments(preset)
    two = experiments["digits-refs__references-2"]
    eight = experiments["digits-refs__references-8"]
    assert two["seed"] == eight["seed"] and model_spec(two) == model_spec(eight)
    for model in ("shadow0", "shadow1"):
        assert model_pretrain(two, model) == model_pretrain(eight, model)
    manifest = tmp_path / "manifest.parquet"
    write_manifest(dataset=two["dataset"], split=two["split"], seed=two["seed"], manifest=manifest)
    tables = {}
    for online in (False, True):
        for model in ("shadow1", "shadow2"):
            out = tmp_path / f"{model}-{online}.parquet"
            write_membership(
                manifest=manifest, model=model, online=online, seed=two["seed"], membership=out
            )
            tables[model, online] = pl.read_parquet(out)
    # The membership file is written from the model's index alone (nothing of the count goes
    # in); two models, and the two families, draw different halves.
    for online in (False, True):
        one, other = tables["shadow1", online], tables["shadow2", online]
        assert one["is_in"].sum() == other["is_in"].sum() == one.height // 2
        assert (one["is_in"] != other["is_in"]).any()
    assert tables["shadow1", True].height > tables["shadow1", False].height


def test_cifar10_usage_preset_dry_runs_on_the_study_base(tmp_path, folder):
    """The usage validation on CIFAR-10 shares the CPU study's split, shards and models (one
    cache trains them once) and adds reference models and the usage audit."""
    preset = PRESETS / "cifar10-usage.yaml"
    extra = _override(folder, {})
    sizes = {f"f{round(100 * f)}": {"fraction": f, "size": 4} for f in (0, 0.25, 0.5, 0.75, 1)}
    extra["defaults"]["usage"] = {"collections": sizes}
    # Enough never-trained-on images to calibrate shadow1..3 (the usage check asks for 40).
    extra["defaults"]["split"]["shadow_nonmember"] = 56
    _, jobs = _dry_run(tmp_path, preset, extra)
    study = resolve_experiments(yaml.safe_load((PRESETS / "cifar10-cpu-study.yaml").read_text()))
    usage = resolve_experiments(yaml.safe_load(preset.read_text()))["cifar10-usage"]
    for key in ("seed", "dataset", "split", "model", "pretrain", "extract"):
        assert usage[key] == study["cifar10-study"][key], key
    assert usage["shadow"]["count"] == 4 and usage["usage"]["enabled"]
    fractions = {c["fraction"] for c in usage["usage"]["collections"].values()}
    assert fractions == {0, 0.25, 0.5, 0.75, 1}
    for model in ("target", "shadow0", "shadow1", "shadow2", "shadow3"):
        assert _count(jobs, "pretrain", experiment="cifar10-usage", model=model) == 1
    assert _count(jobs, "usage", experiment="cifar10-usage") == 1
