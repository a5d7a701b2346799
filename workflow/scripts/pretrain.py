import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

import torch

from mimia.pretrain import pretrain_stage

torch.set_num_threads(snakemake.threads)
pretrain_stage(
    snakemake.params.exp,
    snakemake.wildcards.model,
    snakemake.input.manifest,
    snakemake.input.membership,
    list(snakemake.input.shards),
    snakemake.output.weights,
    snakemake.output.train_log,
)
