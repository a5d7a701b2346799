import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

import torch

from mimia.extract import extract_stage

torch.set_num_threads(snakemake.threads)
checkpoints = {k: snakemake.input[k] for k in ("model", "shadow") if k in snakemake.input.keys()}
extract_stage(
    snakemake.params.exp,
    snakemake.wildcards.model,
    snakemake.wildcards.decoder,
    checkpoints,
    snakemake.input.shard,
    snakemake.input.manifest,
    snakemake.input.membership,
    snakemake.output[0],
)
