rule experiment_metrics:
    input:
        metrics=lambda wc: attack_metrics(wc.experiment),
    output:
        json=f"{EXP}/metrics.json",
        table=f"{EXP}/metrics.parquet",
    log:
        f"{LOGS}/experiment_metrics.log",
    benchmark:
        f"{BENCH}/experiment_metrics.tsv"
    conda:
        "../../envs/mimia.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        exp=exp_sections("ablation"),
    script:
        "../scripts/experiment_metrics.py"


rule figures:
    input:
        errors=rules.collect_errors.output[0],
        metrics=rules.experiment_metrics.output.table,
        rocs=lambda wc: [
            p.replace(".json", "-roc.parquet") for p in attack_metrics(wc.experiment)
        ],
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
        "../../envs/mimia.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/figures.py"


rule summary:
    input:
        expand(f"{RESULTS}/{{experiment}}/metrics.parquet", experiment=EXPERIMENTS),
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
        "../../envs/mimia.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/summary.py"


rule ablation_plot:
    input:
        rules.summary.output.parquet,
    output:
        report(
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
        "../../envs/mimia.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/ablation_plot.py"
