rule split:
    output:
        manifest=f"{EXP}/data/manifest.parquet",
        membership=f"{EXP}/data/shadow_membership.parquet",
    params:
        exp=exp,
    log:
        f"{LOGS}/split.log",
    benchmark:
        f"{BENCH}/split.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../../envs/mimia.yaml"
    script:
        "../scripts/split.py"


rule shard:
    input:
        manifest=rules.split.output.manifest,
    output:
        f"{EXP}/data/shards/{{role}}-{{shard}}.tar",
    params:
        exp=exp,
    log:
        f"{LOGS}/shards/{{role}}-{{shard}}.log",
    benchmark:
        f"{BENCH}/shards/{{role}}-{{shard}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../../envs/mimia.yaml"
    script:
        "../scripts/shard.py"
