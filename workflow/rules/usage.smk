# Dataset usage inference (DUCI): the fraction of each candidate collection the target
# pre-trained on, per (decoder, attack), from the attack stage's target scores and the
# attack's TPR and FPR on the reference models.
rule usage:
    input:
        unpack(usage_inputs),
    output:
        json=f"{EXP}/usage.json",
        parquet=f"{EXP}/usage.parquet",
        figure=report(
            f"{EXP}/usage.png",
            caption="../report/usage.rst",
            category="Dataset usage",
        ),
    log:
        f"{LOGS}/usage.log",
    benchmark:
        f"{BENCH}/usage.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        pairs=lambda wc: usage_pairs(wc.experiment),
        attacks=from_exp(
            lambda e, wc: {a: e["attacks"][a] for a in usage_attacks(e, wc.experiment)}
        ),
        usage=from_exp(lambda e, wc: e["usage"]),
        split=from_exp(lambda e, wc: e["split"]),
        seed=from_exp(lambda e, wc: e["seed"]),
        code=code_identity("usage"),
    script:
        STAGE
