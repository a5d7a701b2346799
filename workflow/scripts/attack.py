import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from mimia.attacks.stage import attack_stage

attack_stage(
    snakemake.params.exp,
    snakemake.wildcards.decoder,
    snakemake.wildcards.attack,
    snakemake.input.errors,
    snakemake.input.membership,
    snakemake.output.scores,
    snakemake.output.roc,
    snakemake.output.metrics,
    embeddings=list(snakemake.input.get("embeddings", [])),
)
