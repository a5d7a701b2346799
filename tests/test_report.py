import json

import numpy as np
import polars as pl

from mimia.metrics import evaluate, roc_frame
from mimia.provenance import write_parquet
from mimia.report.figures import ablation_figure, roc_figure
from mimia.report.tables import experiment_metrics, markdown_table, summary


def _attack_outputs(tmp_path, decoder, attack, shift, seed):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(200, bool), np.zeros(200, bool)]
    scores = rng.normal(size=400) + shift * labels
    folder = tmp_path / "attacks" / decoder
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {"decoder": decoder, "attack": attack, **evaluate(labels, scores, n_bootstrap=100)}
    metrics |= {"manifest_sha256": "f" * 64, "mimia_version": "test"}
    (folder / f"{attack}.json").write_text(json.dumps(metrics))
    write_parquet(
        pl.DataFrame({"score": scores}),
        folder / f"{attack}.parquet",
        {"manifest_sha256": "f" * 64, "mimia_version": "test"},
    )
    write_parquet(roc_frame(labels, scores), folder / f"{attack}-roc.parquet", {})
    return folder / f"{attack}.json"


def test_experiment_table_summary_and_markdown(tmp_path):
    files = [
        _attack_outputs(tmp_path, d, a, s, i)
        for i, (d, a, s) in enumerate(
            [("shadow", "threshold", 0.5), ("shadow", "lira", 1.5), ("adapted", "threshold", 1.0)]
        )
    ]
    tables = []
    for name, ablation in (
        ("base", None),
        ("base__k-4", {"name": "k", "parameter": "extract.num_masks", "value": 4, "order": 0}),
    ):
        df = experiment_metrics(
            name, 3, ablation, files, tmp_path / f"{name}.json", tmp_path / f"{name}.parquet"
        )
        assert df.height == 3
        tables.append(tmp_path / f"{name}.parquet")
    info = json.loads((tmp_path / "base.json").read_text())
    assert info["seed"] == 3 and info["manifest_sha256"] == "f" * 64 and len(info["results"]) == 3
    out = summary(tables, tmp_path / "s.parquet", tmp_path / "s.csv", tmp_path / "s.md")
    assert out.height == 6
    assert out.filter(pl.col("experiment") == "base__k-4")["ablation_value"].to_list() == ["4"] * 3
    md = (tmp_path / "s.md").read_text()
    lira = out.filter((pl.col("attack") == "lira") & (pl.col("experiment") == "base")).row(
        0, named=True
    )
    assert f"{lira['auc']:.3f} [{lira['auc_ci_low']:.3f}, {lira['auc_ci_high']:.3f}]" in md
    assert md.count("\n| base") == 6 and markdown_table(out) == md
    ablation_figure(out, "k", tmp_path / "ablation.png")
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"


def test_roc_figure_writes_a_png(tmp_path):
    labels = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    scores = np.linspace(0, 1, 100)[::-1]
    rocs = {("shadow", "threshold"): roc_frame(labels, scores)}
    roc_figure(rocs, {("shadow", "threshold"): 1.0}, tmp_path / "roc.png", title="t")
    assert (tmp_path / "roc.png").stat().st_size > 1000
