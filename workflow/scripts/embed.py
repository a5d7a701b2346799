import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

import torch

from mimia.extract import embed_stage

torch.set_num_threads(snakemake.threads)
embed_stage(
    snakemake.params.exp,
    snakemake.wildcards.model,
    snakemake.input.weights,
    list(snakemake.input.shards),
    snakemake.input.manifest,
    snakemake.input.membership,
    snakemake.output[0],
)
