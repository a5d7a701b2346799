# Each attack fitted on the adversary's data and scored on the target under one decoder.
# Params: that attack's own entry only, so tuning one attack reruns it and the report alone.


rule attack:
    input:
        unpack(attack_inputs),
    output:
        scores=PATTERN.attack("{decoder}", "{attack}", "scores"),
        roc=PATTERN.attack("{decoder}", "{attack}", "roc"),
        metrics=PATTERN.attack("{decoder}", "{attack}", "metrics"),
    log:
        f"{LOGS}/attack/{{decoder}}-{{attack}}.log",
    benchmark:
        f"{BENCH}/attack/{{decoder}}-{{attack}}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        code=code_identity("attack"),
        decoder="{decoder}",
        attack="{attack}",
        params=from_exp(attack_entry),
        metrics_config=from_exp(lambda e, wc: section(e, "metrics")),
        seed=from_exp(lambda e, wc: e["seed"]),
    script:
        STAGE
