# The role split, one membership file per shadow model, and webdataset shards per role.
# Their outputs depend only on the data and split settings: cached between workflows.


rule manifest:
    input:
        assignment=split_assignment,
    output:
        manifest=PATTERN.manifest,
    log:
        f"{LOGS}/manifest.log",
    cache: "omit-software"
    priority: 30
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        code=code_identity("manifest"),
        dataset=from_exp(lambda e, wc: section(e, "dataset", drop=["img_size"])),
        split=from_exp(lambda e, wc: section(e, "split", drop=["shard_size"])),
        seed=from_exp(lambda e, wc: e["seed"]),
        # The source's files: adding, removing or replacing an image reruns the split; a
        # touch or copy (same bytes) does not. Digests of unchanged files are kept between
        # DAG builds.
        source_fingerprint=from_exp(
            lambda e, wc: source_fingerprint(e["dataset"], SOURCE_DIGESTS)
        ),
    script:
        STAGE


rule membership:
    input:
        manifest=PATTERN.manifest,
    output:
        membership=PATTERN.membership("{model}"),
    log:
        f"{LOGS}/membership/{{model}}.log",
    priority: 30
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_identity("membership"),
        model="{model}",
        seed=from_exp(lambda e, wc: e["seed"]),
        online=from_exp(
            lambda e, wc: e["shadow"]["online"] and wc.model != PAPER_SHADOW
        ),
    script:
        STAGE


rule shard:
    input:
        manifest=PATTERN.manifest,
    output:
        shard=PATTERN.shard("{role}", "{shard}"),
    log:
        f"{LOGS}/shards/{{role}}-{{shard}}.log",
    cache: "omit-software"
    priority: 30
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        code=code_identity("shard"),
        dataset=from_exp(lambda e, wc: section(e, "dataset")),
        shard_size=from_exp(lambda e, wc: e["split"]["shard_size"]),
        role="{role}",
        index=lambda wc: int(wc.shard),
    script:
        STAGE
