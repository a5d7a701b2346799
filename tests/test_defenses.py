"""Defenses: Opacus' per-sample gradients against one backward pass per sample, DP-SGD's
accounting, determinism and resume, early stopping, the adversary's knowledge of the defense,
and the defenses example config."""

import copy
import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mimia.config import model_pretrain, resolve_experiments
from mimia.masking import random_masks
from mimia.models import build_model
from mimia.training import (
    PerSampleGradients,
    TrainConfig,
    heldout_loss,
    holdout_split,
    train_dp,
    train_early_stopped,
    train_mim,
)

ROOT = Path(__file__).resolve().parents[1]
DP = {"max_grad_norm": 1.0, "delta": 1e-5, "accountant": "rdp"}


def _images(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("recipe", ["mae", "simmim"])
def test_per_sample_gradients_equal_one_backward_pass_per_sample(recipe, tiny_spec):
    spec = tiny_spec
    if recipe == "simmim":
        spec = dataclasses.replace(tiny_spec, recipe="simmim", mask_patch_size=8)
    torch.manual_seed(0)
    model = build_model(spec).double().train()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 16, 16, generator=g, dtype=torch.float64)
    mask = random_masks(6, spec.num_patches, 0.75, generator=g, block_size=spec.mask_block)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    naive = {n: [] for n in trainable}
    for i in range(6):
        model.zero_grad()
        model(x[i : i + 1], mask[i : i + 1])[0].sum().backward()
        for n, p in trainable.items():
            naive[n].append(p.grad.clone())
    model.zero_grad()
    grads = PerSampleGradients(model)
    try:
        losses = grads.step(x, mask)
        per_sample = {n: p.grad_sample.clone() for n, p in trainable.items()}
    finally:
        grads.close()
    # The cls token (and the mask tokens) are outside Opacus' layers: the broadcast-token path.
    assert "encoder.cls_token" in grads.tokens
    assert ("decoder.mask_token" if recipe == "mae" else "mask_token") in grads.tokens
    torch.testing.assert_close(losses, model(x, mask)[0].detach(), rtol=1e-12, atol=0)
    for n in trainable:
        torch.testing.assert_close(per_sample[n], torch.stack(naive[n]), rtol=1e-9, atol=1e-12)
    # Hooks removed: the model trains normally afterwards.
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_an_empty_poisson_batch_is_a_noise_only_step(tiny_spec):
    from opacus.optimizers import DPOptimizer

    model = build_model(tiny_spec)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = PerSampleGradients(model)
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=8,
        generator=torch.Generator().manual_seed(0),
    )
    try:
        empty = torch.zeros(0, 3, 16, 16)
        assert grads.step(empty, torch.zeros(0, 16, dtype=torch.bool)).shape == (0,)
        optimizer.step()
    finally:
        grads.close()
    steps = []
    for n, p in model.named_parameters():
        if p.requires_grad:
            steps.append((p.detach() - before[n]).flatten())
        else:
            torch.testing.assert_close(p.detach(), before[n])
    # The noise alone: sigma * C / expected batch = 1.0 * 1.0 / 8 per coordinate, mean 0.
    steps = torch.cat(steps)
    assert steps.std().item() == pytest.approx(0.125, rel=0.02)
    assert abs(steps.mean().item()) < 0.01


def _cfg(**over):
    section = {"epochs": 3, "batch_size": 8, "warmup_epochs": 1, "blr": 1e-2, "checkpoint_every": 1}
    return TrainConfig.from_section(section | over, seed=3)


def test_dp_training_spends_the_target_epsilon_at_the_accountants_noise(tiny_spec):
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    torch.manual_seed(0)
    model = build_model(tiny_spec)
    history, privacy = train_dp(model, _images(), _cfg(), DP | {"target_epsilon": 8.0})
    # 40 images, batch 8: sample rate 0.2, 5 Poisson steps per epoch, 15 steps.
    assert privacy["sample_rate"] == pytest.approx(0.2) and privacy["steps"] == 15
    sigma = get_noise_multiplier(
        target_epsilon=8.0, target_delta=1e-5, sample_rate=0.2, steps=15, accountant="rdp"
    )
    assert privacy["noise_multiplier"] == pytest.approx(sigma)
    accountant = RDPAccountant()
    accountant.history = [(sigma, 0.2, 15)]
    assert privacy["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5))
    assert 7.9 < privacy["epsilon"] <= 8.0
    epsilons = [h["epsilon"] for h in history]
    assert epsilons == sorted(epsilons) and epsilons[-1] == pytest.approx(privacy["epsilon"])
    assert all(math.isfinite(h["loss"]) for h in history)
    # Less noise, more epsilon; no noise, no guarantee.
    torch.manual_seed(0)
    _, loud = train_dp(build_model(tiny_spec), _images(), _cfg(), DP | {"noise_multiplier": 2.0})
    torch.manual_seed(0)
    _, quiet = train_dp(build_model(tiny_spec), _images(), _cfg(), DP | {"noise_multiplier": 0.5})
    assert loud["epsilon"] < quiet["epsilon"]
    torch.manual_seed(0)
    _, none = train_dp(build_model(tiny_spec), _images(), _cfg(), DP | {"noise_multiplier": 0.0})
    assert none["epsilon"] is None


def test_dp_training_is_seeded_and_a_killed_run_resumes_to_the_same_weights(tmp_path, tiny_spec):
    dp = DP | {"noise_multiplier": 1.0}
    cfg = _cfg(augment=True)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(tiny_spec)
        history, _ = train_dp(model, _images(), cfg, dp)
        runs.append((model.state_dict(), history))
    for k, v in runs[0][0].items():
        torch.testing.assert_close(v, runs[1][0][k], rtol=0, atol=0)
    torch.manual_seed(0)
    killed = build_model(tiny_spec)
    resume = tmp_path / "resume.pt"
    train_dp(killed, _images(), cfg, dp, resume_path=resume, fingerprint="x", stop_after_epoch=1)
    assert resume.exists()
    torch.manual_seed(0)
    resumed = build_model(tiny_spec)
    history, privacy = train_dp(resumed, _images(), cfg, dp, resume_path=resume, fingerprint="x")
    for k, v in runs[0][0].items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)
    assert [h["loss"] for h in history] == [h["loss"] for h in runs[0][1]]
    assert privacy["steps"] == 15  # the accountant resumed too


def test_a_truncated_dp_resume_file_is_set_aside_and_dp_training_starts_over(
    tmp_path, tiny_spec, capsys
):
    dp = DP | {"noise_multiplier": 1.0}
    torch.manual_seed(0)
    reference = build_model(tiny_spec)
    ref_history, _ = train_dp(reference, _images(), _cfg(), dp)
    resume = tmp_path / "resume.pt"
    torch.manual_seed(0)
    train_dp(build_model(tiny_spec), _images(), _cfg(), dp, resume, "x", stop_after_epoch=0)
    resume.write_bytes(resume.read_bytes()[:1000])  # a run killed while writing it
    capsys.readouterr()
    torch.manual_seed(0)
    model = build_model(tiny_spec)
    history, privacy = train_dp(model, _images(), _cfg(), dp, resume, "x")
    log = capsys.readouterr().err
    assert f"resume file {resume} is unusable (1000 bytes;" in log
    assert resume.with_name("resume.pt.corrupt-1").stat().st_size == 1000
    assert [h["loss"] for h in history] == [h["loss"] for h in ref_history]
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    assert privacy["steps"] == 15


def test_dp_with_a_parameter_opacus_cannot_sample_is_refused_by_name(tiny_spec):
    model = build_model(tiny_spec)
    model.encoder.blocks[0].ls1 = torch.nn.Module()
    model.encoder.blocks[0].ls1.gamma = torch.nn.Parameter(torch.ones(32))
    with pytest.raises(ValueError, match=r"encoder\.blocks\.0\.ls1\.gamma"):
        PerSampleGradients(model)


def test_early_stopping_trains_all_images_for_the_epoch_the_held_out_loss_chose(tiny_spec):
    images = _images(48)
    ids = [f"s{i:03d}" for i in range(48)]
    cfg = _cfg(epochs=8, checkpoint_every=25)
    early = {"holdout": 0.25, "every": 2, "patience": 2, "min_delta": 0.0, "num_masks": 2}
    torch.manual_seed(0)
    model = build_model(tiny_spec)
    init = copy.deepcopy(model)
    history, record = train_early_stopped(model, images, ids, cfg, early)
    held = holdout_split(ids, 0.25, cfg.seed)
    assert record["holdout_ids"] == held and len(held) == 12
    assert record["num_selection_train"] == 36 and record["final_run_images"] == 48
    curve = record["curve"]
    assert [c["epoch"] for c in curve][:2] == [1, 3]
    best = min(curve, key=lambda c: c["heldout_loss"])
    assert record["best_epoch"] == best["epoch"] and len(history) == best["epoch"] + 1
    # The selection run, redone by hand, gives the recorded held-out losses...
    selection = copy.deepcopy(init)
    keep = [i for i, s in enumerate(ids) if s not in set(held)]
    pick = [i for i, s in enumerate(ids) if s in set(held)]
    train_mim(selection, images[keep], cfg, stop_after_epoch=curve[0]["epoch"])
    first = heldout_loss(selection, images[pick], held, cfg.seed, cfg, 2)
    assert first == pytest.approx(curve[0]["heldout_loss"], rel=1e-6)
    # ...and the final model is train_mim on every image, stopped after the best epoch.
    final = copy.deepcopy(init)
    train_mim(final, images, cfg, stop_after_epoch=record["best_epoch"])
    for k, v in final.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


def _config(**experiment) -> dict:
    return {"experiments": {"e": experiment}}


def test_shadow_models_follow_the_adversarys_knowledge_of_the_defense():
    dp = {"pretrain": {"dp": {"target_epsilon": 8}, "epochs": 50, "augment": True}}
    knows = resolve_experiments(_config(**dp))["e"]
    assert model_pretrain(knows, "shadow1") == model_pretrain(knows, "target")
    assert model_pretrain(knows, "target")["dp"]["target_epsilon"] == 8
    naive = resolve_experiments(
        _config(**dp, shadow={"knows_defense": False, "pretrain": {"augment": False}})
    )["e"]
    shadow = model_pretrain(naive, "shadow0")
    assert "dp" not in shadow and shadow["augment"] is False and shadow["epochs"] == 50
    assert model_pretrain(naive, "target") == model_pretrain(knows, "target")
    # The default experiment's params are what they were before defenses existed.
    plain = resolve_experiments(_config())["e"]
    assert model_pretrain(plain, "shadow2") == model_pretrain(plain, "target") == plain["pretrain"]
    assert "dp" not in plain["pretrain"] and "early_stopping" not in plain["pretrain"]


@pytest.mark.parametrize(
    "experiment, message",
    [
        ({"pretrain": {"dp": {"max_grad_norm": 1.0}}}, "exactly one of noise_multiplier"),
        (
            {"pretrain": {"dp": {"noise_multiplier": 1.0, "target_epsilon": 3}}},
            "exactly one of noise_multiplier",
        ),
        ({"pretrain": {"dp": {"noise_multiplier": 1.0}, "accum_iter": 2}}, "accum_iter must be 1"),
        (
            {"pretrain": {"dp": {"noise_multiplier": 1.0}, "early_stopping": {}}},
            "dp and early_stopping together",
        ),
        ({"shadow": {"pretrain": {"epochs": 10}}}, "knows_defense true"),
        (
            {"shadow": {"knows_defense": False, "pretrain": {"epochs": 0}}},
            "shadow.pretrain: epochs: 0 is less than the minimum",
        ),
        (
            {"pretrain": {"early_stopping": {"holdout": 0.5}, "batch_size": 300}},
            "leaves 200 training images, fewer than batch_size=300",
        ),
    ],
)
def test_bad_defense_settings_fail_naming_the_setting(experiment, message):
    with pytest.raises(ValueError, match=message):
        resolve_experiments(_config(**experiment))


def test_the_defenses_example_resolves_and_dry_runs(tmp_path):
    config = yaml.safe_load((ROOT / "config/examples/defenses.yaml").read_text())
    experiments = resolve_experiments(config)  # the defense checks included
    dp = {n: e["pretrain"].get("dp") for n, e in experiments.items()}
    assert any(d and d.get("target_epsilon") == 8 for d in dp.values())
    assert any(d and d.get("noise_multiplier") == 0 for d in dp.values())  # epsilon = inf
    assert any(d is None for d in dp.values())
    assert all(
        e["audit"]["enabled"] and e["dataset"]["name"] == "digits" for e in experiments.values()
    )
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory",
         str(tmp_path), "--configfile", str(ROOT / "config/examples/defenses.yaml"),
         "--cores", "2", "--dry-run", "--quiet", "rules"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = {
        parts[0]: int(parts[1])
        for parts in map(str.split, run.stdout.splitlines())
        if len(parts) == 2 and parts[1].isdigit()
    }
    assert jobs["privacy_utility"] == 1
    assert jobs["privacy_audit"] == jobs["utility"] == len(experiments)


TINY_DP = yaml.safe_load((ROOT / ".test" / "config" / "defenses.yaml").read_text())


@pytest.mark.slow
def test_dp_pretraining_runs_through_the_workflow_with_its_epsilon_recorded(tmp_path):
    import json

    import polars as pl

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY_DP))
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory",
         str(tmp_path), "--configfile", str(tmp_path / "config.yaml"), "--cores", "2"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1800,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-5000:]
    results = tmp_path / "results"
    target = json.loads((results / "tiny-dp/models/target/model.json").read_text())["info"]
    assert 3.9 < target["dp"]["epsilon"] <= 4.0 and target["dp"]["sampling"] == "poisson"
    shadow = json.loads((results / "tiny-dp/models/shadow1/model.json").read_text())["info"]
    assert "dp" not in shadow and "dp" not in shadow["train_config"]  # the naive adversary
    log = pl.read_parquet(results / "tiny-dp/models/target/model.train_log.parquet")
    assert log["epsilon"][-1] == pytest.approx(target["dp"]["epsilon"])
    privacy = json.loads((results / "tiny-dp/privacy.json").read_text())
    assert privacy["accountant_epsilon"] == pytest.approx(target["dp"]["epsilon"])
    assert {r["attack"] for r in privacy["results"]} == {"threshold", "lira"}
    table = pl.read_parquet(results / "summary_privacy_utility.parquet")
    assert table.height == 2 and set(table["accountant_epsilon"]) == {target["dp"]["epsilon"]}
    assert 0.0 <= table["linear_probe_accuracy"][0] <= 1.0
    assert (results / "privacy_utility.png").read_bytes()[:4] == b"\x89PNG"
    assert "tiny-dp" in (results / "summary_privacy_utility.md").read_text()


def test_dp_without_noise_or_clipping_gives_the_plain_engines_weights(tiny_spec):
    """The engines differ only where they say: DP-SGD's backward step with noise 0 and a
    clipping bound no gradient reaches, on the plain engine's batches and masks, is the
    plain engine's step (up to float rounding of the per-sample sum)."""
    from mimia.training import fit
    from mimia.training.dp import DPSGD
    from mimia.training.engines import Plain

    class ShuffledDPSGD(DPSGD):
        """DP-SGD's step on the plain engine's batches and generator layout."""

        def prepare(self, model, images, cfg):
            super().prepare(model, images, cfg)
            self.order = Plain()
            self.order.prepare(model, images, cfg)
            self.steps = self.order.steps

        @property
        def mask_generator(self):
            return self.order.mask_generator

        def batches(self):
            return self.order.batches()

    cfg = _cfg(epochs=3, augment=True)
    torch.manual_seed(0)
    plain = build_model(tiny_spec)
    init = copy.deepcopy(plain)
    plain_history = fit(plain, _images(), cfg, Plain())
    private = copy.deepcopy(init)
    dp = DP | {"noise_multiplier": 0.0, "max_grad_norm": 1e12}
    dp_history = fit(private, _images(), cfg, ShuffledDPSGD(dp))
    assert [h["loss"] for h in dp_history] == pytest.approx(
        [h["loss"] for h in plain_history], rel=1e-5
    )
    # As in the DDP test: attention key biases get gradients of pure rounding noise, which
    # Adam scales up to lr-sized steps, hence an absolute tolerance near the learning rate.
    for (name, a), b in zip(plain.state_dict().items(), private.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4, msg=name)
    # Far tighter than what separates DP-SGD with a clipping bound the gradients do reach.
    clipped = copy.deepcopy(init)
    fit(clipped, _images(), cfg, ShuffledDPSGD(dp | {"max_grad_norm": 1e-3}))
    gap = max((a - b).abs().max().item() for a, b in zip(
        plain.state_dict().values(), clipped.state_dict().values(), strict=True))  # fmt: skip
    assert gap > 1e-3


def test_a_killed_early_stopped_run_resumed_with_other_settings_trains_its_own_epochs(
    tiny_spec, tmp_path
):
    """The final run's resume file names the early-stopping settings and the chosen epoch: a
    run killed before its weights were saved, resumed with other settings (here a min_delta
    no improvement reaches: the first check's epoch wins), must not continue the other run's
    file."""
    images = _images(48)
    ids = [f"s{i:03d}" for i in range(48)]
    cfg = _cfg(epochs=8, checkpoint_every=1)
    base = {"holdout": 0.25, "every": 1, "num_masks": 2}
    settings = {
        "patient": base | {"patience": 8, "min_delta": 0.0},
        "strict": base | {"patience": 1, "min_delta": 1e9},
    }
    resume = tmp_path / "resume.pt"
    records = {}
    for name, early in settings.items():
        torch.manual_seed(0)
        model = build_model(tiny_spec)
        history, records[name] = train_early_stopped(model, images, ids, cfg, early, resume, "f")
        # The final run's resume file stays, as after a kill before the weights were saved.
        assert resume.exists()
        assert len(history) == records[name]["best_epoch"] + 1, name
    assert records["strict"]["best_epoch"] == 0 < records["patient"]["best_epoch"]


@pytest.mark.parametrize(
    "experiment, message",
    [
        # DP-SGD runs one process: devices 2 would double the lr and reserve 2 GPUs for nothing.
        (
            {"pretrain": {"dp": {"noise_multiplier": 1.0}, "devices": 2, "batch_size": 64}},
            r"pretrain.dp trains in one process, so devices must be 1 \(got 2\)",
        ),
        # 400 images in the smallest role, 100 held out: 300 left, under one global batch of
        # 2 x 200 although above batch_size 200.
        (
            {"pretrain": {"early_stopping": {"holdout": 0.25}, "batch_size": 200, "devices": 2}},
            "leaves 300 training images, fewer than batch_size=200 x devices=2",
        ),
    ],
)
def test_defense_settings_follow_the_processes_that_run(experiment, message):
    with pytest.raises(ValueError, match=message):
        resolve_experiments(_config(**experiment))


def test_a_naive_adversarys_shadow_models_may_use_several_processes_beside_a_dp_target():
    experiment = {
        "shadow": {"knows_defense": False, "pretrain": {"devices": 2}},
        "pretrain": {"dp": {"noise_multiplier": 1.0}, "batch_size": 64},
    }
    resolved = resolve_experiments(_config(**experiment))["e"]
    assert model_pretrain(resolved, "shadow0")["devices"] == 2
    assert model_pretrain(resolved, "target")["devices"] == 1
