rule attack:
    input:
        unpack(attack_inputs),
    output:
        scores=f"{EXP}/attacks/{{decoder}}/{{attack}}.parquet",
        roc=f"{EXP}/attacks/{{decoder}}/{{attack}}-roc.parquet",
        metrics=f"{EXP}/attacks/{{decoder}}/{{attack}}.json",
    log:
        f"{LOGS}/attack/{{decoder}}-{{attack}}.log",
    benchmark:
        f"{BENCH}/attack/{{decoder}}-{{attack}}.tsv"
    conda:
        "../../envs/mimia.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        exp=exp_sections("shadow", "attacks", "metrics"),
    script:
        "../scripts/attack.py"
