import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from mimia.report.figures import experiment_figures

experiment_figures(
    snakemake.wildcards.experiment,
    snakemake.input.errors,
    snakemake.input.metrics,
    list(snakemake.input.rocs),
    snakemake.output.roc,
    snakemake.output.histograms,
    snakemake.output.ratios,
)
