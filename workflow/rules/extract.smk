# Reconstruction errors under seeded masks, per (model, decoder, shard), and EncoderMI's view
# embeddings. Params hold only what changes the numbers; batch size, workers and device come
# from the experiment's `runtime` section, read by the job.


rule extract:
    input:
        unpack(scoring_checkpoints),
        shard=PATTERN.shard("{role}", "{shard}"),
        manifest=PATTERN.manifest,
    output:
        errors=PATTERN.errors("{model}", "{decoder}", "{role}", "{shard}"),
    log:
        f"{LOGS}/extract/{{model}}-{{decoder}}-{{role}}-{{shard}}.log",
    benchmark:
        f"{BENCH}/extract/{{model}}-{{decoder}}-{{role}}-{{shard}}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=gpu_resource("gpu"),
        gpu_shard=gpu_resource("gpu_shard"),
        gres=gpu_resource("gres"),
    params:
        code=code_identity("extract"),
        model="{model}",
        decoder="{decoder}",
        seed=from_exp(lambda e, wc: e["seed"]),
        mask_ratios=from_exp(lambda e, wc: e["extract"]["mask_ratios"]),
        num_masks=from_exp(lambda e, wc: e["extract"]["num_masks"]),
    script:
        STAGE


rule collect_errors:
    input:
        tables=lambda wc: error_files(wc.experiment),
    output:
        errors=PATTERN.all_errors,
    log:
        f"{LOGS}/collect_errors.log",
    benchmark:
        f"{BENCH}/collect_errors.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        code=code_identity("collect_errors"),
    script:
        STAGE


rule embed:
    input:
        checkpoint=lambda wc: (
            target_weights(wc.experiment)
            if wc.model == TARGET
            else layout(wc).weights(wc.model)
        ),
        shards=lambda wc: shard_files(wc.experiment, ROLES),
        manifest=PATTERN.manifest,
    output:
        embeddings=PATTERN.embeddings("{model}"),
    log:
        f"{LOGS}/embed/{{model}}.log",
    benchmark:
        f"{BENCH}/embed/{{model}}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=gpu_resource("gpu"),
        gpu_shard=gpu_resource("gpu_shard"),
        gres=gpu_resource("gres"),
    params:
        code=code_identity("embed"),
        model="{model}",
        seed=from_exp(lambda e, wc: e["seed"]),
        num_views=from_exp(lambda e, wc: e["embed"]["num_views"]),
    script:
        STAGE
