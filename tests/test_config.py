from pathlib import Path

import pytest
import yaml

from mimia.config import model_spec, resolve_experiments, train_config

ROOT = Path(__file__).resolve().parents[1]


def default_config() -> dict:
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def test_default_config_resolves_with_defaults_filled():
    exps = resolve_experiments(default_config())
    assert list(exps) == ["digits-mae"]
    e = exps["digits-mae"]
    assert e["pretrain"]["betas"] == [0.9, 0.95] and e["adapt"]["epochs"] == 50
    assert e["target"] == {"checkpoint": None, "format": "mimia"}
    spec = model_spec(e)
    assert (spec.img_size, spec.patch_size, spec.num_patches) == (16, 4, 16)
    assert train_config(e).lr == pytest.approx(2.5e-2 * 25 / 256)


def test_experiment_overrides_merge_deeply():
    cfg = default_config()
    cfg["experiments"]["small-k"] = {"extract": {"num_masks": 4}}
    e = resolve_experiments(cfg)["small-k"]
    assert e["extract"]["num_masks"] == 4
    assert e["extract"]["mask_ratios"] == [0.5, 0.75]  # the rest of the section still comes through


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
        ({"typo": 1}, "typo"),
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
