import copy
import re
from pathlib import Path

import pytest
import yaml

from mimia.config import (
    canonical,
    deep_merge,
    model_spec,
    resolve_experiments,
)
from mimia.schema import schema_defaults
from mimia.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def default_config() -> dict:
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def test_default_config_resolves_with_defaults_filled_from_the_schema():
    exps = resolve_experiments(default_config())
    assert list(exps) == ["digits-mae"]
    e = exps["digits-mae"]
    assert e["pretrain"]["betas"] == [0.9, 0.95] and e["adapt"]["epochs"] == 50
    assert e["pretrain"]["epochs"] == 300 and e["adapt"]["blr"] == e["pretrain"]["blr"]
    assert e["target"] == {"checkpoint": None, "format": "mimia"}
    assert e["runtime"] == {
        "batch_size": 64,
        "compile": False,
        "device": "auto",
        "num_workers": 1,
        "precision": "auto",
    }
    spec = model_spec(e)
    assert (spec.img_size, spec.patch_size, spec.num_patches) == (16, 4, 16)
    assert spec.encoder_overrides == {"depth": 4, "embed_dim": 64, "num_heads": 4}
    cfg = TrainConfig.from_section(e["pretrain"])
    assert cfg.lr == pytest.approx(2.5e-2 * 25 / 256)
    # One source of defaults: a section left out entirely equals the schema's defaults.
    assert TrainConfig.from_section({}) == cfg
    assert schema_defaults("adapt")["warmup_epochs"] == 5


def test_experiment_overrides_merge_deeply():
    cfg = default_config()
    cfg["experiments"]["small-k"] = {"extract": {"num_masks": 4}}
    e = resolve_experiments(cfg)["small-k"]
    assert e["extract"]["num_masks"] == 4
    assert e["extract"]["mask_ratios"] == [0.5, 0.75]  # the rest of the section still comes through


def test_merge_rules_empty_mapping_clears_list_replaces_null_restores_default():
    base = {"model": {"encoder_overrides": {"embed_dim": 32, "depth": 1}, "patch_size": 8}}
    assert deep_merge(base, {"model": {"encoder_overrides": {}}}) == {
        "model": {"encoder_overrides": {}, "patch_size": 8}
    }
    assert deep_merge({"a": [1, 2, 3]}, {"a": [4]}) == {"a": [4]}
    assert deep_merge(base, {"model": {"patch_size": None}}) == {
        "model": {"encoder_overrides": {"embed_dim": 32, "depth": 1}}
    }
    config = {
        "defaults": {
            "model": {"encoder_overrides": {"embed_dim": 32, "depth": 1, "num_heads": 2}},
            "extract": {"mask_ratios": [0.25, 0.5, 0.75]},
        },
        "experiments": {
            "vit-tiny": {"model": {"encoder_overrides": {}}},
            "one-ratio": {"extract": {"mask_ratios": [0.9]}},
            "default-model": {"model": {"encoder_overrides": None}},
        },
    }
    exps = resolve_experiments(config)
    assert exps["vit-tiny"]["model"]["encoder_overrides"] == {}
    assert exps["one-ratio"]["extract"]["mask_ratios"] == [0.9]
    assert (
        exps["default-model"]["model"]["encoder_overrides"]
        == (schema_defaults("model")["encoder_overrides"])
    )


def _readme_configs() -> list[dict]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    return [yaml.safe_load(b) for b in blocks if "experiments:" in b]


def test_readme_example_configs_train_the_models_they_describe():
    import timm  # noqa: F401 - the encoder the README names must exist

    from mimia.models.base import build_vit_encoder

    configs = _readme_configs()
    assert configs, "README has no example configuration"
    specs = {}
    for cfg in configs:
        for name, e in resolve_experiments(cfg).items():
            specs[name] = model_spec(e)
    vit_s = specs["cifar10-vit-small"]
    assert (vit_s.encoder, vit_s.encoder_overrides, vit_s.img_size) == (
        "vit_small_patch16_224",
        {},
        32,
    )
    encoder = build_vit_encoder(vit_s)
    assert (encoder.embed_dim, len(encoder.blocks), encoder.blocks[0].attn.num_heads) == (
        384,
        12,
        6,
    )
    assert specs["digits-mae"].encoder_overrides == {"depth": 4, "embed_dim": 64, "num_heads": 4}
    assert specs["digits-simmim"].recipe == "simmim"


def test_ablations_expand_into_experiments():
    cfg = default_config()
    cfg["ablations"] = {
        "ratio": {
            "base": "digits-mae",
            "parameter": "extract.mask_ratios",
            "values": [[0.5], [0.9]],
        }
    }
    exps = resolve_experiments(cfg)
    assert set(exps) == {"digits-mae", "digits-mae__ratio-0.5", "digits-mae__ratio-0.9"}
    assert exps["digits-mae__ratio-0.9"]["extract"]["mask_ratios"] == [0.9]
    assert exps["digits-mae__ratio-0.9"]["ablation"]["name"] == "ratio"


def test_an_ablation_may_not_replace_an_experiment_of_the_same_name():
    cfg = default_config()
    cfg["experiments"]["digits-mae__epochs-2"] = {"pretrain": {"epochs": 7}}
    cfg["ablations"] = {
        "epochs": {"base": "digits-mae", "parameter": "pretrain.epochs", "values": [2, 4]}
    }
    with pytest.raises(ValueError, match="'digits-mae__epochs-2', which an experiment already"):
        resolve_experiments(cfg)


def test_select_runs_only_the_named_experiments():
    cfg = default_config()
    cfg["experiments"]["other"] = {"seed": 3}
    cfg["select"] = ["other"]
    assert list(resolve_experiments(cfg)) == ["other"]
    cfg["select"] = ["nope"]
    with pytest.raises(ValueError, match=r"select names unknown experiments \['nope'\]"):
        resolve_experiments(cfg)


def test_params_are_canonical_whatever_the_form_of_the_config():
    a = default_config()
    b = copy.deepcopy(a)
    b["experiments"]["digits-mae"] = {
        "split": {"shadow_nonmember": 400, "target_member": 400},  # defaults, written out
        "pretrain": {"checkpoint_every": 25, "epochs": 300.0, "blr": 0.025},
    }
    ea, eb = resolve_experiments(a)["digits-mae"], resolve_experiments(b)["digits-mae"]
    assert repr(ea) == repr(eb)  # Snakemake compares params by repr
    assert isinstance(eb["pretrain"]["epochs"], int)
    assert repr(canonical({"b": 1, "a": {"d": 2, "c": 3}})) == "{'a': {'c': 3, 'd': 2}, 'b': 1}"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"extract": {"mask_ratios": [1.5]}}, "extract.mask_ratios.0"),
        ({"model": {"recipe": "beit"}}, "model.recipe"),
        ({"model": {"patch_size": 5}}, "patch_size 5 does not divide img_size 16"),
        ({"decoder": ["released", "oracle"]}, "decoder.1"),
        ({"pretrain": {"warmup_epochs": 500}}, "warmup_epochs=500 exceeds"),
        ({"split": {"shadow_member": 0}}, "split.shadow_member"),
        ({"pretrain": {"epochs": "many"}}, "pretrain.epochs"),
        ({"pretrain": {"epochs": 20.5}}, "pretrain.epochs"),
        ({"runtime": {"device": "tpu"}}, "runtime.device"),
        ({"attacks": {"nope": {}}}, "unknown attack 'nope'"),
        ({"typo": 1}, "typo"),
        # default split: 400 images per role; 2 processes x 250 is one batch of 500
        (
            {"pretrain": {"batch_size": 250, "devices": 2}},
            r"pretrain.batch_size=250 x devices=2 is larger than the smallest role \(400",
        ),
    ],
)
def test_bad_values_fail_early_naming_the_value(override, message):
    cfg = default_config()
    cfg["experiments"]["bad"] = override
    with pytest.raises(ValueError, match=message):
        resolve_experiments(cfg)


def test_ablation_of_unknown_base_is_refused():
    cfg = default_config()
    cfg["ablations"] = {"k": {"base": "nope", "parameter": "extract.num_masks", "values": [2]}}
    with pytest.raises(ValueError, match="base experiment 'nope'"):
        resolve_experiments(cfg)


def test_encoder_only_target_cannot_use_the_released_decoder():
    cfg = default_config()
    cfg["experiments"]["audit"] = {
        "target": {"checkpoint": "encoder.safetensors", "format": "timm"},
        "decoder": ["released", "adapted"],
    }
    with pytest.raises(ValueError, match="encoder only"):
        resolve_experiments(cfg)


def test_online_attacks_switch_the_reference_models_to_online_training():
    cfg = default_config()
    cfg["experiments"]["online"] = {
        "attacks": {"lira_online": {"attack": "lira", "mode": "online"}}
    }
    exps = resolve_experiments(cfg)
    assert exps["online"]["shadow"]["online"] is True
    assert exps["digits-mae"]["shadow"]["online"] is False


def test_one_reference_model_refuses_attacks_fitted_on_references_before_any_job():
    cfg = default_config()
    cfg["experiments"] = {
        "m1": {"shadow": {"count": 1}, "attacks": {"threshold": {}, "lira": {}}},
    }
    # Offline LiRA fits on shadow0's own errors and scores the target with shadow0 alone.
    assert resolve_experiments(cfg)["m1"]["shadow"]["count"] == 1
    for key, kind in (("rmia_a", "rmia"), ("lira_reference", "lira_reference")):
        bad = copy.deepcopy(cfg)
        bad["experiments"]["m1"]["attacks"][key] = {"attack": kind}
        message = rf"attack '{key}' \({kind}\) .* needs shadow.count >= 2 \(got 1\)"
        with pytest.raises(ValueError, match=message):
            resolve_experiments(bad)


def test_config_resolution_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, yaml; from mimia.config import resolve_experiments; "
        f"resolve_experiments(yaml.safe_load(open({str(ROOT / 'config' / 'config.yaml')!r}))); "
        "heavy = [m for m in ('torch', 'timm', 'sklearn') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_an_ablation_value_may_set_each_of_several_parameters():
    cfg = default_config()
    params = ["split.target_member", "pretrain.epochs"]
    cfg["ablations"] = {
        "steps": {
            "base": "digits-mae",
            "parameter": params,
            "values": [{"split.target_member": 100, "pretrain.epochs": 40}, 50],
        }
    }
    exps = resolve_experiments(cfg)
    line = exps["digits-mae__steps-100_40"]
    assert (line["split"]["target_member"], line["pretrain"]["epochs"]) == (100, 40)
    same = exps["digits-mae__steps-50"]
    assert (same["split"]["target_member"], same["pretrain"]["epochs"]) == (50, 50)
    cfg["ablations"]["steps"]["values"] = [{"split.target_member": 100, "pretrain.epoch": 40}]
    with pytest.raises(ValueError, match="must name exactly the parameters"):
        resolve_experiments(cfg)
