# The target and shadow models, an imported target, and the adapted decoder: the long chain
# of a run (high priority, so it starts before cheap jobs that can wait) and the outputs worth
# reusing between workflows (cached: weights, sidecar and training log under one prefix).


rule pretrain:
    input:
        unpack(pretrain_inputs),
    output:
        multiext(
            f"{EXP}/models/{{model}}/model",
            weights=".safetensors",
            sidecar=".json",
            train_log=".train_log.parquet",
        ),
    log:
        f"{LOGS}/pretrain/{{model}}.log",
    cache: "omit-software"
    priority: 20
    conda:
        ENV
    threads: pretrain_devices
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=gpu_resource("gpu", pretrain_devices),
        gpu_shard=gpu_resource("gpu_shard", pretrain_devices),
        gres=gpu_resource("gres", pretrain_devices),
    params:
        model="{model}",
        spec=from_exp(lambda e, wc: model_spec(e).to_dict()),
        train=from_exp(lambda e, wc: model_pretrain(e, wc.model)),
        seed=from_exp(lambda e, wc: e["seed"]),
    script:
        STAGE


rule import_target:
    input:
        checkpoint=lambda wc: EXPERIMENTS[wc.experiment]["target"]["checkpoint"],
    output:
        multiext(
            f"{EXP}/models/target-imported/model",
            weights=".safetensors",
            sidecar=".json",
        ),
    log:
        f"{LOGS}/pretrain/import_target.log",
    cache: "omit-software"
    priority: 40
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    params:
        format=from_exp(lambda e, wc: e["target"]["format"]),
        spec=from_exp(lambda e, wc: model_spec(e).to_dict()),
        needs_decoder=from_exp(lambda e, wc: "released" in e["decoder"]),
    script:
        STAGE


rule adapt_decoder:
    input:
        unpack(adapt_inputs),
    output:
        multiext(
            f"{EXP}/models/target-adapted/model",
            weights=".safetensors",
            sidecar=".json",
            train_log=".train_log.parquet",
        ),
    log:
        f"{LOGS}/pretrain/adapt_decoder.log",
    cache: "omit-software"
    priority: 10
    conda:
        ENV
    threads: adapt_devices
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=gpu_resource("gpu", adapt_devices),
        gpu_shard=gpu_resource("gpu_shard", adapt_devices),
        gres=gpu_resource("gres", adapt_devices),
    params:
        train=from_exp(lambda e, wc: section(e, "adapt")),
        seed=from_exp(lambda e, wc: e["seed"]),
    script:
        STAGE
