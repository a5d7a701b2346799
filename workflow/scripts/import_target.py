import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from mimia.models.checkpoint import import_stage

import_stage(snakemake.params.exp, snakemake.input.checkpoint, snakemake.output.weights)
