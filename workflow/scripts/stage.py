# Every rule's script: mimia.stages runs the function named like the rule, with the rule's
# inputs, outputs and params as keyword arguments (see src/mimia/stages.py).
from mimia.stages import run_script

run_script(snakemake)
