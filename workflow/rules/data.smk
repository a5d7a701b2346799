rule split:
    input:
        assignment=split_assignment,
    output:
        manifest=f"{EXP}/data/manifest.parquet",
        membership=f"{EXP}/data/shadow_membership.parquet",
    log:
        f"{LOGS}/split.log",
    benchmark:
        f"{BENCH}/split.tsv"
    conda:
        "../../envs/mimia.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        exp=exp_sections("dataset", "split", "shadow"),
    script:
        "../scripts/split.py"


rule shard:
    input:
        manifest=rules.split.output.manifest,
    output:
        f"{EXP}/data/shards/{{role}}-{{shard}}.tar",
    log:
        f"{LOGS}/shards/{{role}}-{{shard}}.log",
    benchmark:
        f"{BENCH}/shards/{{role}}-{{shard}}.tsv"
    conda:
        "../../envs/mimia.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        exp=exp_sections("dataset", "split"),
    script:
        "../scripts/shard.py"
