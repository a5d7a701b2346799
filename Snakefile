# mimia: membership inference against masked-image-modeling encoders.
# Stages: data -> pretrain -> extract -> attack -> report (one rule file each).
import os
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

# The package in src/ holds the logic; make it importable here and in every job (conda envs
# included) without installing it, so a checkout is all a run needs.
SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)
os.environ.update(
    PYTHONPATH=os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))
)


# The shipped experiments, unless the user names a config file of their own: then that file
# alone says what runs (and every default still comes from the schema).
if not workflow.config_settings.configfiles:

    configfile: "config/config.yaml"


from mimia.schema import SCHEMA_DIR

validate(config, str(SCHEMA_DIR / "config.schema.yaml"))


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/attack.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/defense.smk"
include: "workflow/rules/usage.smk"


# One run per results folder; cache entries this run stored are made read-only at its end.
onstart:
    start_run()


onsuccess:
    seal_links(RESULTS)


onerror:
    seal_links(RESULTS)


# Quick bookkeeping and plotting jobs run where Snakemake runs, never as cluster submissions:
# on a cluster each would wait for a node and a status check longer than it runs.
localrules:
    all,
    membership,
    experiment_metrics,
    figures,
    summary,
    ablation_plot,


rule all:
    default_target: True
    input:
        final_outputs(),
        usage_outputs(),
