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
        code=code_identity("pretrain"),
        model="{model}",
        spec=from_exp(lambda e, wc: model_spec(e).to_dict()),
        # Without checkpoint_every: the job reads it itself, so changing it reruns nothing.
        train=from_exp(lambda e, wc: train_params(model_pretrain(e, wc.model))),
        seed=from_exp(lambda e, wc: e["seed"]),
    script:
        STAGE


rule import_target:
    input:
        unpack(import_inputs),
    output:
        multiext(
            f"{EXP}/models/{IMPORTED_TARGET}/model",
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
        code=code_identity("import_target"),
        format=from_exp(lambda e, wc: e["target"]["format"]),
        spec=from_exp(lambda e, wc: model_spec(e).to_dict()),
        needs_decoder=from_exp(lambda e, wc: OWN_DECODER in e["decoder"]),
        stated=from_exp(lambda e, wc: e["target"].get("stated")),
    script:
        STAGE


# Decoder mode `adapted` of the target; of reference model shadow{i} too when the usage audit
# calibrates that mode.
rule adapt_decoder:
    input:
        unpack(adapt_inputs),
    output:
        multiext(
            f"{EXP}/models/{{model}}-adapted/model",
            weights=".safetensors",
            sidecar=".json",
            train_log=".train_log.parquet",
        ),
    log:
        f"{LOGS}/pretrain/adapt_decoder-{{model}}.log",
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
        code=code_identity("adapt_decoder"),
        model=lambda wc: adapted_model(wc.model),
        train=from_exp(lambda e, wc: train_params(e["adapt"])),
        seed=from_exp(lambda e, wc: e["seed"]),
    script:
        STAGE
