rule pretrain:
    input:
        manifest=rules.split.output.manifest,
        membership=rules.split.output.membership,
        shards=pretrain_shards,
    output:
        weights=f"{EXP}/models/{{model}}/model.safetensors",
        sidecar=f"{EXP}/models/{{model}}/model.json",
        train_log=f"{EXP}/models/{{model}}/train_log.parquet",
    log:
        f"{LOGS}/pretrain/{{model}}.log",
    benchmark:
        f"{BENCH}/pretrain/{{model}}.tsv"
    conda:
        "../../envs/mimia.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=config["gpu"],
    params:
        exp=exp_sections("dataset", "model", "pretrain"),
    script:
        "../scripts/pretrain.py"


rule import_target:
    input:
        checkpoint=lambda wc: exp(wc)["target"]["checkpoint"],
    output:
        weights=f"{EXP}/models/target-imported/model.safetensors",
        sidecar=f"{EXP}/models/target-imported/model.json",
    log:
        f"{LOGS}/pretrain/import_target.log",
    benchmark:
        f"{BENCH}/pretrain/import_target.tsv"
    conda:
        "../../envs/mimia.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    params:
        exp=exp_sections("dataset", "model", "target", "decoder"),
    script:
        "../scripts/import_target.py"


rule adapt_decoder:
    input:
        unpack(adapt_inputs),
    output:
        weights=f"{EXP}/models/target-adapted/model.safetensors",
        sidecar=f"{EXP}/models/target-adapted/model.json",
        train_log=f"{EXP}/models/target-adapted/train_log.parquet",
    log:
        f"{LOGS}/pretrain/adapt_decoder.log",
    benchmark:
        f"{BENCH}/pretrain/adapt_decoder.tsv"
    conda:
        "../../envs/mimia.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=config["gpu"],
    params:
        exp=exp_sections("adapt"),
    script:
        "../scripts/adapt_decoder.py"
