import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from mimia.report.tables import summary

summary(
    list(snakemake.input), snakemake.output.parquet, snakemake.output.csv, snakemake.output.markdown
)
