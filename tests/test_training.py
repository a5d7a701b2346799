"""The training entry point's policy: what reruns a training job, and what does not."""

import re
from pathlib import Path

from mimia.config import RERUN_FREE_KEYS, model_pretrain, resolve_experiments, train_params

ROOT = Path(__file__).resolve().parents[1]


def _experiment(**settings) -> dict:
    return resolve_experiments({"experiments": {"e": settings}})["e"]


def test_checkpoint_every_changes_no_training_rule_param():
    """How often resume files are written is like ``runtime``: the params (and so the rerun
    trigger and the between-workflow cache key) of pretrain and adapt_decoder leave it out."""
    a = _experiment(pretrain={"checkpoint_every": 5}, adapt={"checkpoint_every": 5})
    b = _experiment(pretrain={"checkpoint_every": 7}, adapt={"checkpoint_every": 3})
    assert model_pretrain(a, "target") != model_pretrain(b, "target")
    for model in ("target", "shadow0", "shadow1"):
        assert train_params(model_pretrain(a, model)) == train_params(model_pretrain(b, model))
    assert train_params(a["adapt"]) == train_params(b["adapt"])
    assert "checkpoint_every" in RERUN_FREE_KEYS
    # ...and the rules use exactly these params.
    rules = (ROOT / "workflow/rules/pretrain.smk").read_text()
    params = re.findall(r"^\s+train=(.*)$", rules, flags=re.M)
    assert params == [
        "from_exp(lambda e, wc: train_params(model_pretrain(e, wc.model))),",
        'from_exp(lambda e, wc: train_params(e["adapt"])),',
    ]
