# Dataset usage inference (DUCI): the fraction of each candidate collection the target
# pre-trained on, per (decoder, attack), with the attack's TPR and FPR measured on the reference
# models scored as the target is (mimia.usage). A collection given as images (an image folder,
# webdataset shards) is sharded once and scored by the target and every shadow model.


rule usage_collection:
    input:
        manifest=PATTERN.manifest,
    output:
        table=f"{EXP}/usage/{{collection}}/images.parquet",
        shard=f"{EXP}/usage/{{collection}}/images.tar",
    log:
        f"{LOGS}/usage/collection-{{collection}}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        code=code_identity("usage_collection"),
        name="{collection}",
        source=from_exp(
            lambda e, wc: e["usage"]["collections"][wc.collection]["source"]
        ),
        img_size=from_exp(lambda e, wc: e["dataset"]["img_size"]),
        seed=from_exp(lambda e, wc: e["seed"]),
        # Adding, removing or replacing an image of the collection reruns it.
        source_fingerprint=from_exp(
            lambda e, wc: source_fingerprint(
                e["usage"]["collections"][wc.collection]["source"], SOURCE_DIGESTS
            )
        ),
    script:
        STAGE


rule extract_collection:
    input:
        unpack(scoring_checkpoints),
        shard=f"{EXP}/usage/{{collection}}/images.tar",
        manifest=f"{EXP}/usage/{{collection}}/images.parquet",
    output:
        errors=f"{EXP}/usage/{{collection}}/errors/{{model}}/{{decoder}}.parquet",
    log:
        f"{LOGS}/usage/extract-{{collection}}-{{model}}-{{decoder}}.log",
    benchmark:
        f"{BENCH}/usage/extract-{{collection}}-{{model}}-{{decoder}}.tsv"
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
        code=code_identity("extract_collection"),
        model="{model}",
        decoder="{decoder}",
        seed=from_exp(lambda e, wc: e["seed"]),
        mask_ratios=from_exp(lambda e, wc: e["extract"]["mask_ratios"]),
        num_masks=from_exp(lambda e, wc: e["extract"]["num_masks"]),
    script:
        STAGE


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
