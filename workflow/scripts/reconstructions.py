import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from mimia.report.figures import reconstruction_stage

checkpoints = {k: snakemake.input[k] for k in ("model", "shadow") if k in snakemake.input.keys()}
reconstruction_stage(
    snakemake.params.exp,
    snakemake.wildcards.decoder,
    checkpoints,
    snakemake.input.members,
    snakemake.input.nonmembers,
    snakemake.output[0],
)
