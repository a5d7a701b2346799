import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from mimia.report.tables import experiment_metrics

experiment_metrics(
    snakemake.wildcards.experiment,
    snakemake.params.exp,
    list(snakemake.input.metrics),
    snakemake.output.json,
    snakemake.output.table,
)
