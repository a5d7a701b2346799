import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

import polars as pl

from mimia.report.figures import ablation_figure

ablation_figure(
    pl.read_parquet(snakemake.input[0]), snakemake.wildcards.ablation, snakemake.output[0]
)
