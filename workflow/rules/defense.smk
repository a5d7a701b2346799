# Defenses and utility: the target encoder's downstream utility, the empirical privacy audit of
# every attack (epsilon lower bound next to the accountant's), and the privacy–utility figure
# and table over the audited experiments. DP-SGD and early stopping themselves are pretrain
# settings (rule pretrain); the shadow models follow shadow.knows_defense.


rule utility:
    input:
        checkpoint=lambda wc: target_weights(wc.experiment),
        manifest=PATTERN.manifest,
    output:
        record=f"{EXP}/utility.json",
        split=f"{EXP}/utility.parquet",
    log:
        f"{LOGS}/utility.log",
    benchmark:
        f"{BENCH}/utility.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        code=code_identity("utility"),
        dataset=from_exp(lambda e, wc: section(e, "dataset")),
        utility=from_exp(lambda e, wc: section(e, "utility")),
        seed=from_exp(lambda e, wc: e["seed"]),
        source_fingerprint=from_exp(lambda e, wc: source_fingerprint(e["dataset"])),
        experiment=lambda wc: wc.experiment,
    script:
        STAGE


rule privacy_audit:
    input:
        scores=lambda wc: attack_outputs(wc.experiment, "scores"),
        sidecar=lambda wc: str(Path(target_weights(wc.experiment)).with_suffix(".json")),
    output:
        table=f"{EXP}/privacy.parquet",
        record=f"{EXP}/privacy.json",
    log:
        f"{LOGS}/privacy_audit.log",
    benchmark:
        f"{BENCH}/privacy_audit.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_identity("privacy_audit"),
        audit=from_exp(lambda e, wc: section(e, "audit", drop=["enabled"])),
        experiment=lambda wc: wc.experiment,
    script:
        STAGE


rule privacy_utility:
    input:
        metrics=expand(f"{EXP}/metrics.parquet", experiment=audited_experiments()),
        privacy=expand(f"{EXP}/privacy.parquet", experiment=audited_experiments()),
        utility=expand(f"{EXP}/utility.json", experiment=audited_experiments()),
    output:
        figure=report(
            f"{RESULTS}/privacy_utility.png",
            caption="../report/privacy_utility.rst",
            category="Summary",
        ),
        parquet=f"{RESULTS}/summary_privacy_utility.parquet",
        csv=report(
            f"{RESULTS}/summary_privacy_utility.csv",
            caption="../report/privacy_utility_table.rst",
            category="Summary",
        ),
        markdown=f"{RESULTS}/summary_privacy_utility.md",
    log:
        f"{RESULTS}/logs/privacy_utility.log",
    benchmark:
        f"{RESULTS}/benchmarks/privacy_utility.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_identity("privacy_utility"),
        settings={name: describe(EXPERIMENTS[name]) for name in audited_experiments()},
    script:
        STAGE


localrules:
    privacy_audit,
    privacy_utility,
