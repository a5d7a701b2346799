import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)

from mimia.data.prepare import write_shard

w = snakemake.wildcards
write_shard(
    snakemake.params.exp, snakemake.input.manifest, w.role, int(w.shard), snakemake.output[0]
)
