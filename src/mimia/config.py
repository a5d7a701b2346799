"""Experiments from the workflow config: merged, completed from the schema, validated,
ablations expanded, and cut into the per-rule parameters that decide what reruns.

Torch-free by design: the Snakefile resolves the config every time it is read (the DAG build,
and every cluster job), so only yaml, jsonschema and the light registries are imported here.

Merging (``defaults`` under each experiment, an ablation value over its base) follows three
rules: a mapping merges key by key; ``{}`` clears a mapping (``encoder_overrides: {}`` keeps
the named timm encoder's own sizes); any other value, lists included, replaces; ``null``
removes the key so the schema's default applies again.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema

from mimia.layout import ROLES, SHADOW_ROLES, TARGET, TARGET_ROLES, shadow_model
from mimia.schema import SCHEMA_DIR, canonical, check_section, load_schema

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
ABLATION_SEPARATOR = "__"


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` over ``base``: see the module docstring for the three rules."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and value and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_path(d: dict, dotted: str, value: Any) -> dict:
    out = copy.deepcopy(d)
    node = out
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"ablation parameter {dotted!r}: {key!r} is not a section")
    node[leaf] = value
    return out


def results_folder(value: Any) -> str:
    """The ``results`` setting, refused unless it names a folder mimia may fill: not empty
    (outputs would be planned under ``/``), not the filesystem root, not an existing file."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"results: {value!r} is not a folder; give a path such as 'results'")
    path = Path(value).expanduser()
    if path.resolve().parent == path.resolve():
        raise ValueError(f"results: {value!r} is the filesystem root; give a folder of its own")
    if path.exists() and not path.is_dir():
        raise ValueError(f"results: {value!r} is an existing file, not a folder")
    return value.rstrip("/") or value


def whole_numbers(section: str, value: dict) -> dict:
    """``value`` (settings of experiment section ``section``, e.g. ``shadow.pretrain``'s
    overrides of ``pretrain``) with whole-number floats of integer settings made ints, as
    :func:`resolve_experiments` does for every section the schema completes."""

    def walk(schema: dict, node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        props = schema.get("properties", {})
        out = {}
        for key, v in node.items():
            sub = props.get(key, {})
            if sub.get("type") == "integer" and isinstance(v, float) and v.is_integer():
                v = int(v)
            out[key] = walk(sub, v)
        return out

    return walk(load_schema()["properties"][section], value)


def _validator(schema: dict):
    base = jsonschema.Draft202012Validator

    def fill_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
                # YAML writes 20.0 for a whole number now and then: an integer setting gets
                # the int, so it neither crashes later (range(20.0)) nor changes rule params.
                value = instance.get(prop)
                if sub.get("type") == "integer" and isinstance(value, float) and value.is_integer():
                    instance[prop] = int(value)
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": fill_defaults})(schema)


def resolve_experiments(config: dict, schema_dir: Path = SCHEMA_DIR) -> dict[str, dict]:
    """Every experiment (ablations included), merged, completed from the schema, validated.

    ``config["select"]``, when given, keeps only those experiments (after checking every name
    exists).
    """
    defaults = config.get("defaults") or {}
    raw = {name: deep_merge(defaults, exp or {}) for name, exp in config["experiments"].items()}
    for ablation, spec in (config.get("ablations") or {}).items():
        base = spec["base"]
        if base not in config["experiments"]:
            raise ValueError(f"ablation {ablation!r}: base experiment {base!r} is not defined")
        for order, value in enumerate(spec["values"]):
            settings, slug = _ablation_settings(ablation, spec["parameter"], value)
            name = f"{base}{ABLATION_SEPARATOR}{ablation}-{slug}"
            if name in raw:
                what = "an experiment" if name in config["experiments"] else "another ablation"
                raise ValueError(
                    f"ablation {ablation!r} value {value!r} would be experiment {name!r}, "
                    f"which {what} already defines: rename one of them"
                )
            exp = raw[base]
            for dotted, setting in settings:
                exp = set_path(exp, dotted, setting)
            exp["ablation"] = {
                "name": ablation,
                "parameter": spec["parameter"],
                "value": value,
                "order": order,
            }
            raw[name] = exp
    select = config.get("select")
    if select is not None:
        unknown = sorted(set(select) - set(raw))
        if unknown:
            raise ValueError(f"select names unknown experiments {unknown}; defined: {sorted(raw)}")
        raw = {name: raw[name] for name in raw if name in select}
    validator = _validator(load_schema(schema_dir))
    # Before the schema fills in its defaults: which architecture fields the user wrote.
    written = {name: copy.deepcopy(exp) for name, exp in raw.items()}
    resolved = {}
    for name, exp in raw.items():
        if not NAME.match(name):
            raise ValueError(f"experiment name {name!r} must match {NAME.pattern}")
        if isinstance(exp.get("decoder"), str):
            exp["decoder"] = [exp["decoder"]]
        errors = sorted(validator.iter_errors(exp), key=lambda e: list(e.path))
        if errors:
            e = errors[0]
            where = ".".join(str(p) for p in e.path) or "(top level)"
            raise ValueError(f"experiment {name!r}: {where}: {e.message}")
        stated = _stated(written[name])
        try:
            _check(exp, stated)
        except ValueError as err:
            raise ValueError(f"experiment {name!r}: {err}") from None
        if exp["target"]["checkpoint"] and exp["target"]["format"] in UNTOLD_BY_FORMAT:
            # For the import job, which takes only what the user wrote where the checkpoint
            # does not say (a param: only the fields a checkpoint may leave unsaid).
            exp["target"]["stated"] = sorted(set(stated) & set(UNTOLD))
        resolved[name] = canonical(exp)
    return resolved


def _as_list(x) -> list:
    return x if isinstance(x, list) else [x]


def _ablation_settings(ablation: str, parameter, value) -> tuple[list[tuple[str, Any]], str]:
    """The ``(dotted key, value)`` pairs one ablation value sets, and its name's slug.

    Several parameters take the same value, unless the value is a mapping whose keys are
    exactly the parameters: then each takes its own (a sweep along a line, such as images per
    role x epochs at a fixed number of optimiser steps), and the slug lists the distinct
    values in parameter order.
    """
    params = _as_list(parameter)
    if len(params) > 1 and isinstance(value, dict) and set(value) & set(params):
        if set(value) != set(params):
            raise ValueError(
                f"ablation {ablation!r} value {value!r}: a value given per parameter must "
                f"name exactly the parameters {params}"
            )
        slugs = dict.fromkeys(_slug(value[dotted]) for dotted in params)
        return [(d, value[d]) for d in params], "_".join(slugs)
    return [(dotted, value) for dotted in params], _slug(value)


def _slug(value: Any) -> str:
    text = "_".join(map(str, value)) if isinstance(value, list) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text)


# Architecture fields that a timm state dict or an MAE release does not record (an MAE training
# checkpoint's args may): for an imported target they must be what the user wrote.
UNTOLD = ("num_heads", "norm_eps", "decoder_num_heads", "norm_pix_loss", "mean", "std")
# Per format, those the config must state before any job runs (a timm file never says them;
# an MAE checkpoint is checked by the import job, which reads its args).
UNTOLD_BY_FORMAT = {"timm": ("num_heads", "norm_eps"), "mae": ()}


def _stated(exp: dict) -> list[str]:
    """Architecture fields (:func:`mimia.models.spec.architecture` names) that an experiment
    as written, before schema defaults, sets: ``model`` keys, ``encoder_overrides`` keys (not
    the encoder name's table) and ``dataset.img_size``."""
    model = exp.get("model") or {}
    out = {k for k in model if k != "encoder_overrides"}
    out |= set(model.get("encoder_overrides") or {})
    if "img_size" in (exp.get("dataset") or {}):
        out.add("img_size")
    return sorted(out)


def _check(exp: dict, stated: Iterable[str] = ()) -> None:
    """Cross-field checks the schema cannot express, so bad input fails before any job."""
    if exp["split"].get("assignment"):
        # Role sizes come from the assignment: shard counts are needed to build the DAG.
        exp["split"].update(_assignment_sizes(exp["split"]["assignment"]))
    try:
        spec = model_spec(exp)
    except ValueError as err:
        unwritten = [
            k
            for k in ("num_heads", "decoder_num_heads")
            if f".{k}=" in str(err) and k not in stated
        ]
        hint = (
            f" ({', '.join(unwritten)} not written: the value is the default of encoder "
            f"{exp['model']['encoder']!r} or the schema; write it in the model section)"
            if unwritten
            else ""
        )
        raise ValueError(f"model: {err}{hint}") from None
    _check_target(exp, spec, stated)
    _check_attacks(exp)
    exp["shadow"]["pretrain"] = whole_numbers("pretrain", exp["shadow"]["pretrain"])
    check_defenses(exp)
    check_privacy_budget(exp)
    check_usage(exp)
    for section in ("pretrain", "adapt"):
        cfg = exp[section]
        if cfg["warmup_epochs"] > cfg["epochs"]:
            raise ValueError(
                f"{section}.warmup_epochs={cfg['warmup_epochs']} exceeds "
                f"{section}.epochs={cfg['epochs']}"
            )
        smallest = min(exp["split"][r] for r in ROLES)
        # Each of the `devices` processes takes batch_size images of every global batch.
        batch = cfg["batch_size"] * cfg["devices"]
        if batch > smallest:
            per_device = f" x devices={cfg['devices']}" if cfg["devices"] > 1 else ""
            raise ValueError(
                f"{section}.batch_size={cfg['batch_size']}{per_device} is larger than the "
                f"smallest role ({smallest} images)"
            )


def _assignment_sizes(path: str) -> dict[str, int]:
    import polars as pl

    from mimia.data.splits import read_assignment

    try:
        roles = read_assignment(path)
    except (OSError, ValueError, pl.exceptions.PolarsError) as err:
        raise ValueError(f"split.assignment: {err}") from None
    counts = dict(roles.group_by("role").len().rows())
    empty = [role for role in ROLES if not counts.get(role)]
    if empty:
        raise ValueError(f"split.assignment leaves roles {empty} empty")
    return {role: counts[role] for role in ROLES}


def _check_target(exp: dict, spec, stated: Iterable[str] = ()) -> None:
    """A released target must be what the ``model`` section describes: that section builds
    the shadow models, whose decoders go on the target encoder. What its checkpoint cannot
    record must be written in the experiment, not filled in from defaults."""
    from mimia.models.spec import config_key, declared_spec, spec_differences

    target = exp["target"]
    if not target["checkpoint"]:
        return
    if target["format"] == "timm" and "released" in exp["decoder"]:
        raise ValueError(
            "a timm target checkpoint is an encoder only; decoder mode 'released' needs the "
            "target's decoder (use decoder: [shadow, adapted])"
        )
    unstated = [k for k in UNTOLD_BY_FORMAT.get(target["format"], ()) if k not in set(stated)]
    if unstated:
        keys = ", ".join(config_key(k) for k in unstated)
        raise ValueError(
            f"target.checkpoint {target['checkpoint']} (format {target['format']}) does not "
            f"record {keys}: write {'it' if len(unstated) == 1 else 'them'} in the experiment's "
            f"model section (mimia takes neither the schema's defaults nor the encoder name's "
            f"table for an imported target)"
        )
    declared = declared_spec(target["checkpoint"], target["format"])
    if declared is None:  # timm / mae: checked against the tensors' shapes at import
        return
    # A released encoder keeps its own normalisation; the decoder is the shadow's in
    # the encoder-only modes, so its fields need not match unless it is used as released.
    ignore = ["mean", "std"]
    if "released" not in exp["decoder"]:
        ignore += ["decoder_embed_dim", "decoder_depth", "decoder_num_heads"]
    diff = spec_differences(declared, spec, ignore=ignore)
    if diff:
        raise ValueError(
            f"target.checkpoint {target['checkpoint']} is not the architecture the model "
            f"section describes ({'; '.join(diff)}). The checkpoint is the audited target "
            f"and wins; describe it in the model section, which also builds the shadow models"
        )


def _check_attacks(exp: dict) -> None:
    from mimia.attacks import needs_fit_references, needs_online_references, validate_entry

    ratios = exp["extract"]["mask_ratios"]
    online = False
    for key, entry in exp["attacks"].items():
        if not NAME.match(key):
            raise ValueError(f"attack result name {key!r} must match {NAME.pattern}")
        kind, params = validate_entry(key, entry, ratios)
        online |= needs_online_references(kind, params)
        if exp["shadow"]["count"] < 2 and needs_fit_references(kind, params):
            # Caught here, not by the attack job after every model has trained.
            raise ValueError(
                f"attack {key!r} ({kind}) is fitted on shadow0 with shadow1..N-1 as its "
                f"reference models and needs shadow.count >= 2 (got "
                f"{exp['shadow']['count']}); raise shadow.count or drop {key!r}"
            )
    # Online attacks need reference models that trained on the queried images: one switch.
    exp["shadow"]["online"] = exp["shadow"]["online"] or online


def attack_kind(entry: dict | None, key: str) -> str:
    """The registry name of the attack behind result name ``key``."""
    return (entry or {}).get("attack", key)


def model_spec(exp: dict):
    from mimia.models.spec import ModelSpec

    m = dict(exp["model"])
    if m.get("mean") is not None:
        m["mean"], m["std"] = tuple(m["mean"]), tuple(m["std"])
    else:
        m.pop("mean", None), m.pop("std", None)
    return ModelSpec(img_size=exp["dataset"]["img_size"], **m)


def section(exp: dict, name: str, drop: Iterable[str] = ()) -> dict:
    """A config section without the keys in ``drop``, canonical (for rule params)."""
    return canonical({k: v for k, v in exp[name].items() if k not in set(drop)})


# -- training sections and defenses -------------------------------------------------------------
RERUN_FREE_KEYS = ("checkpoint_every",)
"""Training keys that change how a job runs, not what it computes (like ``runtime``): kept out
of the rule params, so changing them reruns nothing; the job reads them itself."""

DEFENSE_KEYS = ("dp", "early_stopping")
"""``pretrain`` keys that are defenses rather than the recipe's settings: ``dp`` (DP-SGD with
Opacus) and ``early_stopping`` (the epoch count chosen on a held-out slice of the training
images). ``shadow.knows_defense`` says whether the adversary's shadow and reference models
train with the target's defense or without it (then with ``shadow.pretrain`` over the target's
other settings)."""


def split_defenses(train: dict) -> tuple[dict, dict | None, dict | None]:
    """A ``pretrain`` section as ``(recipe settings, dp, early_stopping)``."""
    recipe = {k: v for k, v in train.items() if k not in DEFENSE_KEYS}
    return recipe, train.get("dp"), train.get("early_stopping")


def model_pretrain(exp: dict, model: str) -> dict:
    """The ``pretrain`` section ``model`` trains with: the target's own; a shadow model's is the
    same when the adversary knows the defense, else the target's without ``dp`` and
    ``early_stopping`` and with ``shadow.pretrain`` merged over it."""
    section = exp["pretrain"]
    if model == TARGET or exp["shadow"]["knows_defense"]:
        return canonical(section)
    recipe, _, _ = split_defenses(section)
    return canonical(deep_merge(recipe, exp["shadow"]["pretrain"]))


def train_params(section: dict) -> dict:
    """A training section as a rule param: without :data:`RERUN_FREE_KEYS`."""
    return canonical({k: v for k, v in section.items() if k not in RERUN_FREE_KEYS})


def check_defenses(exp: dict) -> None:
    """Cross-field checks of the defense settings (part of config resolution); ValueError
    naming the key."""
    shadow = exp["shadow"]
    if shadow["knows_defense"] and shadow["pretrain"]:
        raise ValueError(
            f"shadow.pretrain {shadow['pretrain']} is what an adversary who does not know the "
            f"defense assumes; with shadow.knows_defense true the shadow models train with "
            f"the target's pretrain section: set knows_defense false or drop shadow.pretrain"
        )
    sections = {"pretrain": exp["pretrain"]}
    if not shadow["knows_defense"]:
        sections["pretrain for the shadow models"] = model_pretrain(exp, shadow_model(0))
        _check_shadow_pretrain(sections["pretrain for the shadow models"])
    smallest_role = min(exp["split"][r] for r in ("target_member", "shadow_member"))
    for where, section in sections.items():
        _, dp, early = split_defenses(section)
        if dp is not None:
            if ("noise_multiplier" in dp) == ("target_epsilon" in dp):
                raise ValueError(
                    f"{where}.dp needs exactly one of noise_multiplier and target_epsilon, "
                    f"got {sorted(dp)}"
                )
            if section["accum_iter"] != 1:
                raise ValueError(
                    f"{where}.dp: Poisson sampling draws a fresh batch every step, so "
                    f"accum_iter must be 1 (got {section['accum_iter']}); raise batch_size"
                )
            if section["devices"] != 1:
                # DP-SGD runs in one process: more would neither run nor be accounted for,
                # yet would scale the learning rate and reserve that many GPUs.
                raise ValueError(
                    f"{where}.dp trains in one process, so devices must be 1 (got "
                    f"{section['devices']}); raise batch_size instead"
                )
            if early is not None:
                raise ValueError(
                    f"{where}: dp and early_stopping together would choose the epoch count on "
                    f"private images outside the accountant; use pretrain.epochs with dp"
                )
        if early is not None:
            kept = smallest_role - math.ceil(early["holdout"] * smallest_role)
            batch = section["batch_size"] * section["devices"]
            if kept < batch:
                per_device = f" x devices={section['devices']}" if section["devices"] > 1 else ""
                raise ValueError(
                    f"{where}.early_stopping.holdout={early['holdout']} leaves {kept} training "
                    f"images, fewer than batch_size={section['batch_size']}{per_device}"
                )


# Opacus' RDP accountant's orders (RDPAccountant.DEFAULT_ALPHAS), kept here so that the
# config check needs neither Opacus nor torch; tests/test_inputs.py checks them against it.
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


def rdp_epsilon_floor(delta: float) -> float:
    """The smallest epsilon Opacus' RDP accountant can certify at ``delta``, however much
    noise: its conversion from Renyi DP at orders up to 63 never goes below this."""
    return min(
        -(math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a) for a in RDP_ORDERS
    )


def check_privacy_budget(exp: dict) -> None:
    """Refuse a ``pretrain.dp`` whose guarantee is void or cannot be reached, naming the key:
    ``delta`` not below 1 / N (N: the target's training images) permits releasing one of
    them outright; a ``target_epsilon`` at or below what the RDP accountant can certify at
    that ``delta`` makes the job fail after the data are prepared."""
    dp = exp["pretrain"].get("dp")
    if dp is None:
        return
    n = exp["split"]["target_member"]
    if dp["delta"] >= 1 / n:
        raise ValueError(
            f"pretrain.dp.delta={dp['delta']:g} is not below 1/N = 1/{n}, N being the "
            f"target's training images: such a guarantee allows leaking an image; use a delta "
            f"well below {1 / n:.3g}"
        )
    if "target_epsilon" in dp and dp["accountant"] == "rdp":
        floor = rdp_epsilon_floor(dp["delta"])
        if dp["target_epsilon"] <= floor:
            raise ValueError(
                f"pretrain.dp.target_epsilon={dp['target_epsilon']:g} is too small for the "
                f"rdp accountant: at delta={dp['delta']:g} it certifies no epsilon below "
                f"{floor:.4f}, however much noise; raise target_epsilon or delta"
            )


def _check_shadow_pretrain(section: dict) -> None:
    try:
        check_section("pretrain", section)
    except ValueError as err:
        raise ValueError(f"shadow.pretrain: {err}") from None


def describe(exp: dict) -> dict[str, Any]:
    """The defense settings of an experiment, flat, for tables and figure labels."""
    section = exp["pretrain"]
    _, dp, early = split_defenses(section)
    return {
        "dp_noise_multiplier": None if dp is None else dp.get("noise_multiplier"),
        "dp_target_epsilon": None if dp is None else dp.get("target_epsilon"),
        "dp_max_grad_norm": None if dp is None else dp["max_grad_norm"],
        "epochs": section["epochs"],
        "augment": section["augment"],
        "weight_decay": section["weight_decay"],
        "mask_ratio": section["mask_ratio"],
        "early_stopping": early is not None,
        "knows_defense": exp["shadow"]["knows_defense"],
    }


# -- usage audit (candidate collections) --------------------------------------------------------
def check_usage(experiment: dict, name: str = "") -> None:
    """Config-time checks of an experiment's ``usage`` section (ValueError naming the value)."""
    usage = experiment["usage"]
    if not usage["enabled"]:
        return
    where = f"experiment {name!r}: usage" if name else "usage"
    if experiment["shadow"]["count"] < 2:
        raise ValueError(
            f"{where} needs shadow.count >= 2: shadow1..N-1 are the reference models whose "
            f"known membership gives the attack's TPR and FPR (got {experiment['shadow']['count']})"
        )
    if not usage["collections"]:
        raise ValueError(f"{where}.collections is empty: name at least one candidate collection")
    for cname, spec in usage["collections"].items():
        collection_plan(cname, spec, experiment["split"], where)
    from mimia.attacks import attack_class

    count = experiment["shadow"]["count"]
    calibrated = [
        a
        for a in usage_attacks(experiment, name)
        if "references" in attack_class(attack_kind(experiment["attacks"][a], a)).inputs
    ]
    if experiment["shadow"]["online"]:
        raise ValueError(
            f"{where}: shadow.online trains the reference models on the target roles' images, "
            "but the usage audit scores a collection with references that never trained on "
            "it, and calibrates each reference model the same way; use offline references "
            "(shadow.online: false)"
        )
    nonmembers = experiment["split"]["shadow_nonmember"]
    # Reference model k is calibrated on the shadow_nonmember images none of its references
    # (shadow0 and the other N-2, random halves) trained on: a 2^-(N-2) share, half of it k's.
    images = (count - 1) * nonmembers / 2 ** (count - 2)
    if calibrated and images < 40:
        raise ValueError(
            f"{where}: attacks {calibrated} score each reference model with the others as "
            f"references, on the shadow_nonmember images none of them trained on: with "
            f"shadow.count {count} and split.shadow_nonmember {nonmembers} that is about "
            f"{images:.0f} images over shadow1..{count - 1}, under 40 (20 members and 20 "
            "non-members) to measure TPR and FPR on; raise split.shadow_nonmember or lower "
            "shadow.count"
        )


def usage_attacks(experiment: dict, name: str = "") -> list[str]:
    """The attacks the usage audit uses: ``usage.attacks``, or every attack of the experiment
    that scores reconstruction errors (EncoderMI's features exist only for target and shadow0,
    not for every reference model)."""
    from mimia.attacks import requires_embeddings

    attacks = experiment["attacks"]
    wanted = experiment["usage"]["attacks"] or [
        a for a in attacks if not requires_embeddings(attack_kind(attacks[a], a))
    ]
    where = f"experiment {name!r}: usage.attacks" if name else "usage.attacks"
    for a in wanted:
        if a not in attacks:
            raise ValueError(
                f"{where} names {a!r}, not an attack of the experiment: {list(attacks)}"
            )
        if requires_embeddings(attack_kind(attacks[a], a)):
            raise ValueError(
                f"{where} names {a!r}, an EncoderMI attack: its features are not computed for "
                "the reference models, so its TPR and FPR cannot be measured"
            )
    if not wanted:
        raise ValueError(f"{where}: the experiment has no attack on reconstruction errors to use")
    return list(wanted)


def collection_plan(name: str, spec: dict, split: dict, where: str = "usage") -> dict:
    """``{"role": r}``, ``{"members": k, "nonmembers": n - k}`` or ``{"source": {...}}`` for a
    collection entry; checks it against the split's role sizes, or that its source says where
    the images are."""
    where = f"{where}.collections.{name}"
    if "source" in spec:
        source = spec["source"]
        needed = {"image_folder": "path", "webdataset": "urls"}[source["name"]]
        if not source.get(needed):
            raise ValueError(f"{where}.source: {source['name']} needs {needed!r} (got {source!r})")
        return {"source": source}
    if "role" in spec:
        role = spec["role"]
        if role in SHADOW_ROLES:
            raise ValueError(
                f"{where}: role {role!r} is the adversary's own data (the reference models "
                "trained on it); a candidate collection must lie outside it"
            )
        if role not in TARGET_ROLES:
            raise ValueError(f"{where}: unknown role {role!r}; expected one of {list(ROLES)}")
        return {"role": role}
    size, fraction = spec["size"], spec["fraction"]
    if size < 1:
        raise ValueError(f"{where}: size {size}: the candidate collection is empty")
    members = round(fraction * size)
    plan = {"members": members, "nonmembers": size - members}
    for role, key in (("target_member", "members"), ("target_nonmember", "nonmembers")):
        if plan[key] > split[role]:
            raise ValueError(
                f"{where}: fraction {fraction} of {size} images takes {plan[key]} from {role}, "
                f"which holds {split[role]} (split.{role})"
            )
    return plan


def gpu_request(gpu: int, share: int, processes: int = 1) -> dict[str, int | str]:
    """The GPU resources of a job of ``processes`` training/scoring processes: ``gpu`` (whole
    GPUs, the SLURM plugin's ``--gpus``), ``gpu_shard`` (shares of a GPU, the local counter
    capped at GPUs x ``share``) and ``gres`` (``shard:1`` on SLURM when the job takes a share).

    With ``share`` > 1 a one-process job takes one share and no whole GPU; a job of several
    processes takes ``processes`` whole GPUs, all of their shares included, so that locally it
    never runs beside a job holding a share of one of them.
    """
    if share > 1 and gpu != 1:
        raise ValueError(
            f"gpu_share: {share} splits one GPU among {share} jobs, so every job must ask for "
            f"one GPU (gpu: 1), not gpu: {gpu}"
        )
    if share > 1 and processes == 1:
        return {"gpu": 0, "gpu_shard": 1, "gres": "shard:1"}
    return {"gpu": gpu * processes, "gpu_shard": gpu * processes * share, "gres": ""}


def check_runtime_devices(experiments: dict[str, dict], gpu: int, *, local: bool) -> None:
    """``runtime.device: cuda`` fails before any job: when the config asks the scheduler for
    no GPU (``gpu: 0``: its jobs would land where there is none, or crowd one GPU unbounded)
    and, for jobs that run on this machine (``local``), when it has no CUDA device.
    ``auto`` never fails: it takes CUDA where there is one."""
    cuda = {
        name: e["runtime"]["device"]
        for name, e in experiments.items()
        if e["runtime"]["device"].startswith("cuda")
    }
    if not cuda:
        return
    name, device = next(iter(cuda.items()))
    if gpu == 0:
        raise ValueError(
            f"experiment {name!r}: runtime.device is {device!r} but the config's gpu is 0, so "
            f"its jobs ask for no GPU: set gpu: 1 (or runtime.device: auto)"
        )
    if local:
        from mimia.devices import cuda_problem  # imports torch: only when CUDA is asked for

        for name, device in cuda.items():
            problem = cuda_problem(device)
            if problem:
                raise ValueError(f"experiment {name!r}: {problem}")
