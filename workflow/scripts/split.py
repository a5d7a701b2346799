import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from mimia.data.prepare import write_split

write_split(snakemake.params.exp, snakemake.output.manifest, snakemake.output.membership)
