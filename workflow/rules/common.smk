# Experiments, paths, params and input functions shared by every stage. Torch-free: reading
# the workflow (the DAG build, every cluster job) imports only the config layer. Every rule's
# `code` param is the hash of the code its stage runs (mimia.provenance.code_identity): a code
# change reruns what it affects, and the between-workflow cache keys on it.
import hashlib
import json
import re

from mimia.attacks import requires_embeddings
from mimia.config import (
    attack_kind,
    canonical,
    check_runtime_devices,
    gpu_request,
    describe,
    model_pretrain,
    model_spec,
    resolve_experiments,
    results_folder,
    section,
    train_params,
    usage_attacks,
)
from mimia.data.sources import source_fingerprint
from mimia.layout import (
    DECODER_MODES,
    IMPORTED_TARGET,
    OWN_DECODER,
    PAPER_SHADOW,
    ROLES,
    TARGET,
    SHADOW_ROLES,
    TARGET_ROLES,
    Layout,
    adapted_model,
    shard_count,
    shadow_models,
)
from mimia.provenance import code_identity
from mimia.storage import claim_experiments, lock_results, seal_links

RESULTS = results_folder(config["results"])
EXPERIMENTS = resolve_experiments(config)
# Jobs run here (not on a cluster's nodes): runtime.device cuda must find a GPU on this machine.
check_runtime_devices(
    EXPERIMENTS, config["gpu"], local=workflow.local_exec and workflow.is_main_process
)
EXP = f"{RESULTS}/{{experiment}}"
LOGS = f"{RESULTS}/logs/{{experiment}}"
BENCH = f"{RESULTS}/benchmarks/{{experiment}}"
SOURCE_DIGESTS = f"{RESULTS}/.source-digests.json"
PATTERN = Layout(RESULTS, "{experiment}")
STAGE = "../scripts/stage.py"
ENV = "../../envs/mimia.yaml"


wildcard_constraints:
    experiment="|".join(map(re.escape, EXPERIMENTS)),
    role="|".join(ROLES),
    shard=r"\d{6}",
    model=rf"{TARGET}|shadow\d+",
    decoder="|".join(DECODER_MODES),
    collection="|".join(
        sorted(
            {
                re.escape(c)
                for e in EXPERIMENTS.values()
                for c in e["usage"]["collections"]
            }
        )
    ),
    attack="|".join(
        sorted({re.escape(a) for e in EXPERIMENTS.values() for a in e["attacks"]})
    ),
    ablation="|".join(
        sorted(
            {
                re.escape(e["ablation"]["name"])
                for e in EXPERIMENTS.values()
                if e.get("ablation")
            }
        )
        or ["(?!)"]
    ),


def layout(wildcards):
    return Layout(RESULTS, wildcards.experiment)


def from_exp(fn):
    """A params function: ``fn(experiment config, wildcards)``."""
    return lambda wildcards: fn(EXPERIMENTS[wildcards.experiment], wildcards)


# -- data ---------------------------------------------------------------------------------------
def split_assignment(wildcards):
    path = EXPERIMENTS[wildcards.experiment]["split"]["assignment"]
    return [path] if path else []


def shard_files(experiment, roles):
    return Layout(RESULTS, experiment).shards(EXPERIMENTS[experiment]["split"], roles)


# -- models -------------------------------------------------------------------------------------
def target_weights(experiment):
    imported = EXPERIMENTS[experiment]["target"]["checkpoint"]
    return Layout(RESULTS, experiment).weights(IMPORTED_TARGET if imported else TARGET)


def pretrain_inputs(wildcards):
    e, model = wildcards.experiment, wildcards.model
    lay = Layout(RESULTS, e)
    if model == TARGET:
        return {"manifest": lay.manifest, "shards": shard_files(e, ["target_member"])}
    # The paper's shadow model trains on shadow_member whatever the mode.
    online = EXPERIMENTS[e]["shadow"]["online"] and model != PAPER_SHADOW
    roles = list(SHADOW_ROLES) + (list(TARGET_ROLES) if online else [])
    return {
        "manifest": lay.manifest,
        "membership": lay.membership(model),
        "shards": shard_files(e, roles),
    }


def import_inputs(wildcards):
    e = wildcards.experiment
    exp = EXPERIMENTS[e]
    inputs = {"checkpoint": exp["target"]["checkpoint"]}
    if OWN_DECODER in exp["decoder"]:
        # The first audit images, on which the released decoder tests the stated heads and
        # LayerNorm eps (mimia.models.plausibility).
        inputs["images"] = shard_files(e, ["target_member"])[:1]
    return inputs


def adapt_inputs(wildcards):
    """The target's adapted decoder trains on the adversary's images; a reference model's (the
    usage audit's calibration) on the target roles', which it never trained on."""
    e, base = wildcards.experiment, wildcards.model
    lay = Layout(RESULTS, e)
    return {
        "encoder": target_weights(e) if base == TARGET else lay.weights(base),
        "shadow": lay.weights(PAPER_SHADOW),
        "manifest": lay.manifest,
        "shards": shard_files(e, SHADOW_ROLES if base == TARGET else TARGET_ROLES),
    }


def scoring_checkpoints(wildcards):
    """Checkpoints that make up the scoring model of (model, decoder)."""
    e, decoder = wildcards.experiment, wildcards.decoder
    lay = Layout(RESULTS, e)
    model = getattr(wildcards, "model", TARGET)
    # A reference model wears the other modes only for the usage audit's calibration.
    encoder = target_weights(e) if model == TARGET else lay.weights(model)
    if decoder == "adapted":
        return {"checkpoint": lay.weights(adapted_model(model))}
    if decoder == "shadow":
        return {"checkpoint": encoder, "shadow_decoder": lay.weights(PAPER_SHADOW)}
    return {"checkpoint": encoder}


# -- errors and attacks -------------------------------------------------------------------------
def error_files(experiment):
    """Every per-shard error table an experiment's attacks read: the target under each decoder
    on the target roles, every shadow model with its own decoder on every role."""
    e = EXPERIMENTS[experiment]
    lay = Layout(RESULTS, experiment)
    scored = [(TARGET, d, TARGET_ROLES) for d in e["decoder"]]
    scored += [(m, OWN_DECODER, ROLES) for m in shadow_models(e["shadow"]["count"])]
    return [
        lay.errors(model, decoder, role, i)
        for model, decoder, roles in scored
        for role in roles
        for i in range(shard_count(e["split"], role))
    ]


def attack_entry(e, wildcards):
    return e["attacks"][wildcards.attack]


def attack_inputs(wildcards):
    e = EXPERIMENTS[wildcards.experiment]
    lay = Layout(RESULTS, wildcards.experiment)
    inputs = {
        "errors": lay.all_errors,
        "manifest": lay.manifest,
        "membership": [lay.membership(m) for m in shadow_models(e["shadow"]["count"])],
    }
    kind = attack_kind(attack_entry(e, wildcards), wildcards.attack)
    if requires_embeddings(kind):
        inputs["embeddings"] = [lay.embeddings(m) for m in (TARGET, PAPER_SHADOW)]
    return inputs


def attack_outputs(experiment, kind):
    """Output ``kind`` (scores, roc, metrics) of every (decoder, attack) of an experiment."""
    e = EXPERIMENTS[experiment]
    lay = Layout(RESULTS, experiment)
    return [lay.attack(d, a, kind) for d in e["decoder"] for a in e["attacks"]]


def pretrain_devices(wc):
    """Processes (one per GPU) that train ``wc.model`` together; the job asks for as many
    GPUs (``gpu`` per device) and cores. DP-SGD runs in one process: the config refuses
    ``devices`` above 1 with ``dp``, so no job reserves GPUs it cannot use."""
    return model_pretrain(EXPERIMENTS[wc.experiment], wc.model)["devices"]


def adapt_devices(wc):
    """As :func:`pretrain_devices`, for the decoder adaptation."""
    return EXPERIMENTS[wc.experiment]["adapt"]["devices"]


# -- GPUs ---------------------------------------------------------------------------------------
gpu_request(config["gpu"], config["gpu_share"])  # a bad gpu / gpu_share pair fails here
# Locally the shares of GPUs are a counter of their own, capped at the GPUs offered
# (--resources gpu=N; the default profile offers 1) x gpu_share, unless --resources names it.
if workflow.is_main_process and workflow.local_exec:
    offered = workflow.global_resources.get("gpu").value
    if offered is not None and "gpu_shard" not in workflow.global_resources:
        workflow.register_resource("gpu_shard", offered * config["gpu_share"])


def gpu_resource(name, processes=lambda wc: 1):
    """Resource ``name`` (gpu, gpu_shard, gres) of a GPU job of ``processes(wc)`` processes:
    see :func:`mimia.config.gpu_request`."""
    share = config["gpu_share"]
    return lambda wc: gpu_request(config["gpu"], share, processes(wc))[name]


# -- defenses and utility -----------------------------------------------------------------------
def audited_experiments():
    """Experiments in the privacy audit and the privacy–utility figure."""
    return [name for name, e in EXPERIMENTS.items() if e["audit"]["enabled"]]


def defense_outputs():
    outputs = [
        f"{RESULTS}/{name}/utility.json"
        for name, e in EXPERIMENTS.items()
        if e["utility"]["enabled"] or e["audit"]["enabled"]
    ]
    if audited_experiments():
        outputs += [
            f"{RESULTS}/privacy_utility.png",
            f"{RESULTS}/summary_privacy_utility.parquet",
        ]
    return outputs


def final_outputs():
    outputs = [f"{RESULTS}/summary.parquet", *defense_outputs()]
    ablations = {
        e["ablation"]["name"] for e in EXPERIMENTS.values() if e.get("ablation")
    }
    outputs += [f"{RESULTS}/ablations/{name}.png" for name in sorted(ablations)]
    for experiment, e in EXPERIMENTS.items():
        root = Layout(RESULTS, experiment).root
        outputs += [f"{root}/metrics.json", f"{root}/roc.png"]
        outputs += [f"{root}/figures/reconstructions-{d}.png" for d in e["decoder"]]
    return outputs


# -- one run per results folder -----------------------------------------------------------------
def config_identity(e):
    """What an experiment's results depend on: its config less the rerun-free runtime."""
    settings = canonical({k: v for k, v in e.items() if k != "runtime"})
    return hashlib.sha256(json.dumps(settings, default=str).encode()).hexdigest()


def claim_results(record):
    """Check (and with ``record``, write) each experiment folder's config record."""
    identities = {name: config_identity(e) for name, e in EXPERIMENTS.items()}
    claim_experiments(RESULTS, identities, record=record)


def start_run():
    """Hold the results folder for this run (mimia.storage.lock_results), record each
    experiment's config there, and seal cache entries that earlier runs linked."""
    lock_results(RESULTS)
    claim_results(record=True)
    seal_links(RESULTS)


# Checked when the workflow is read too: a run that finds "nothing to be done" never starts,
# and would otherwise accept another config's results as its own.
if workflow.is_main_process:
    claim_results(record=False)


# -- dataset usage inference --------------------------------------------------------------------
def usage_pairs(experiment):
    e = EXPERIMENTS[experiment]
    return [[d, a] for d in e["decoder"] for a in usage_attacks(e, experiment)]


def source_collections(e):
    """The usage collections given as image sources (not roles of the split)."""
    return [n for n, spec in e["usage"]["collections"].items() if "source" in spec]


def usage_inputs(wildcards):
    """The error table; the reference models shadow1..N-1 under each encoder-only decoder mode
    on the adversary's images (their calibration); and for a collection given as images, its
    table and every model's errors on it (the target under each mode, the shadow models as
    references)."""
    name = wildcards.experiment
    e = EXPERIMENTS[name]
    lay = Layout(RESULTS, name)
    shadows = shadow_models(e["shadow"]["count"])
    calibrated = [
        lay.errors(m, d, role, i)
        for d in e["decoder"]
        if d != OWN_DECODER
        for m in shadows[1:]
        for role in SHADOW_ROLES
        for i in range(shard_count(e["split"], role))
    ]
    sources = source_collections(e)
    scored = [(TARGET, d) for d in e["decoder"]] + [(m, OWN_DECODER) for m in shadows]
    return {
        "errors": lay.all_errors,
        "manifest": lay.manifest,
        "membership": [lay.membership(m) for m in shadows],
        "calibration_errors": calibrated,
        "collection_tables": [lay.collection_table(c) for c in sources],
        "collection_errors": [
            lay.collection_errors(c, m, d) for c in sources for m, d in scored
        ],
    }


def usage_outputs():
    return [
        f"{RESULTS}/{name}/usage.json"
        for name, e in EXPERIMENTS.items()
        if e["usage"]["enabled"]
    ]
