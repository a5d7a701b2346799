# Per-experiment metrics and figures, the cross-experiment summary and ablation plots. What a
# figure shows comes from its inputs' metadata (decoder, attack), never from file names.


rule reconstructions:
    input:
        unpack(scoring_checkpoints),
        manifest=PATTERN.manifest,
        members=lambda wc: shard_files(wc.experiment, ["target_member"]),
        nonmembers=lambda wc: shard_files(wc.experiment, ["target_nonmember"]),
    output:
        figure=report(
            f"{EXP}/figures/reconstructions-{{decoder}}.png",
            caption="../report/reconstructions.rst",
            category="{experiment}",
            subcategory="Reconstructions",
            labels={"decoder": "{decoder}"},
        ),
    log:
        f"{LOGS}/reconstructions-{{decoder}}.log",
    benchmark:
        f"{BENCH}/reconstructions-{{decoder}}.tsv"
    conda:
        ENV
    threads: 1
    # CPU only, but on a cluster it shares submissions with extraction, whose GPU share
    # (gres) every job of a group must name alike.
    resources:
        mem_mb=2000,
        runtime=10,
        gres=gpu_resource("gres"),
    params:
        code=code_identity("reconstructions"),
        decoder="{decoder}",
        seed=from_exp(lambda e, wc: e["seed"]),
        mask_ratio=from_exp(lambda e, wc: e["extract"]["mask_ratios"][0]),
        grid_samples=from_exp(lambda e, wc: e["extract"]["grid_samples"]),
    script:
        STAGE


rule experiment_metrics:
    input:
        metrics=lambda wc: attack_outputs(wc.experiment, "metrics"),
    output:
        record=f"{EXP}/metrics.json",
        table=f"{EXP}/metrics.parquet",
    log:
        f"{LOGS}/experiment_metrics.log",
    benchmark:
        f"{BENCH}/experiment_metrics.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=code_identity("experiment_metrics"),
        experiment="{experiment}",
        seed=from_exp(lambda e, wc: e["seed"]),
        ablation=from_exp(lambda e, wc: e.get("ablation")),
    script:
        STAGE


rule figures:
    input:
        errors=PATTERN.all_errors,
        manifest=PATTERN.manifest,
        metrics=rules.experiment_metrics.output.table,
        rocs=lambda wc: attack_outputs(wc.experiment, "roc"),
    output:
        roc=report(
            f"{EXP}/roc.png",
            caption="../report/roc.rst",
            category="{experiment}",
            subcategory="ROC curves",
        ),
        histograms=report(
            f"{EXP}/figures/error_histograms.png",
            caption="../report/histograms.rst",
            category="{experiment}",
            subcategory="Errors",
        ),
        ratios=report(
            f"{EXP}/figures/error_vs_mask_ratio.png",
            caption="../report/mask_ratio.rst",
            category="{experiment}",
            subcategory="Errors",
        ),
    log:
        f"{LOGS}/figures.log",
    benchmark:
        f"{BENCH}/figures.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_identity("figures"),
        experiment="{experiment}",
        seed=from_exp(lambda e, wc: e["seed"]),
    script:
        STAGE


rule summary:
    input:
        tables=expand(f"{EXP}/metrics.parquet", experiment=EXPERIMENTS),
    output:
        parquet=f"{RESULTS}/summary.parquet",
        csv=report(
            f"{RESULTS}/summary.csv",
            caption="../report/summary.rst",
            category="Summary",
        ),
        markdown=f"{RESULTS}/summary.md",
    log:
        f"{RESULTS}/logs/summary.log",
    benchmark:
        f"{RESULTS}/benchmarks/summary.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=code_identity("summary"),
    script:
        STAGE


rule ablation_plot:
    input:
        summary=rules.summary.output.parquet,
    output:
        figure=report(
            f"{RESULTS}/ablations/{{ablation}}.png",
            caption="../report/ablation.rst",
            category="Ablations",
            labels={"ablation": "{ablation}"},
        ),
    log:
        f"{RESULTS}/logs/ablations/{{ablation}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/ablations/{{ablation}}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=code_identity("ablation_plot"),
        ablation="{ablation}",
    script:
        STAGE
