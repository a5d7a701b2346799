import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from mimia.extract import collect_errors

collect_errors(list(snakemake.input), snakemake.output[0])
