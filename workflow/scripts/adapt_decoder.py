import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

import torch

from mimia.decoders import adapt_stage

torch.set_num_threads(snakemake.threads)
adapt_stage(
    snakemake.params.exp,
    snakemake.input.target,
    snakemake.input.shadow,
    snakemake.input.manifest,
    list(snakemake.input.shards),
    snakemake.output.weights,
    snakemake.output.train_log,
)
