rule extract:
    input:
        unpack(scoring_checkpoints),
        shard=f"{EXP}/data/shards/{{role}}-{{shard}}.tar",
        manifest=rules.split.output.manifest,
        membership=rules.split.output.membership,
    output:
        f"{EXP}/errors/{{model}}/{{decoder}}/{{role}}-{{shard}}.parquet",
    log:
        f"{LOGS}/extract/{{model}}-{{decoder}}-{{role}}-{{shard}}.log",
    benchmark:
        f"{BENCH}/extract/{{model}}-{{decoder}}-{{role}}-{{shard}}.tsv"
    conda:
        "../../envs/mimia.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=config["gpu"],
    params:
        exp=exp_sections("pretrain", "extract"),
    script:
        "../scripts/extract.py"


rule collect_errors:
    input:
        lambda wc: error_files(wc.experiment),
    output:
        f"{EXP}/errors.parquet",
    log:
        f"{LOGS}/collect_errors.log",
    benchmark:
        f"{BENCH}/collect_errors.tsv"
    conda:
        "../../envs/mimia.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/collect_errors.py"


rule reconstructions:
    input:
        unpack(scoring_checkpoints),
        members=lambda wc: shard_files(wc.experiment, "target_member")[0],
        nonmembers=lambda wc: shard_files(wc.experiment, "target_nonmember")[0],
    output:
        report(
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
        "../../envs/mimia.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        exp=exp_sections("pretrain", "extract"),
        model="target",
    script:
        "../scripts/reconstructions.py"


rule embed:
    input:
        weights=lambda wc: model_weights(wc.experiment, wc.model),
        shards=lambda wc: [
            f for role in ROLES for f in shard_files(wc.experiment, role)
        ],
        manifest=rules.split.output.manifest,
        membership=rules.split.output.membership,
    output:
        f"{EXP}/embeddings/{{model}}.parquet",
    log:
        f"{LOGS}/embed/{{model}}.log",
    benchmark:
        f"{BENCH}/embed/{{model}}.tsv"
    conda:
        "../../envs/mimia.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=config["gpu"],
    params:
        exp=exp_sections("extract", "embed"),
    script:
        "../scripts/embed.py"
