"""Checkpoint I/O: safetensors weights plus a JSON sidecar with the architecture.

``model.safetensors`` holds tensors only (no code runs on load); ``model.json`` beside it holds
the :class:`ModelSpec` and free-form provenance (training config, seed, ...).

Released weights from elsewhere are imported offline, from a local path, by
:func:`import_checkpoint` (or the per-format functions it dispatches to):

``mimia``
    this module's own safetensors + sidecar pair (:func:`load_model`).
``timm``
    a timm ``VisionTransformer`` state dict, e.g. ``vit_base_patch16_224.mae``: encoder only.
``mae``
    facebookresearch/mae ``.pth``: a release (``{"model": state_dict}``, with or without its
    decoder) or a training checkpoint ``checkpoint-N.pth`` (``model``, ``optimizer``,
    ``epoch``, ``scaler`` and the run's ``args``, an ``argparse.Namespace``).
``hf``
    a HuggingFace ``ViTMAEForPreTraining.save_pretrained`` folder (config.json + weights),
    read without importing ``transformers``.

Nothing about the architecture is guessed: each field is read from the checkpoint (tensor
shapes, official ``args``, config.json, the sidecar) or given by the caller (the experiment's
model section), and the importer prints which, to stderr (the job's log). Heads, LayerNorm
epsilon and ``norm_pix_loss`` are not in the weights: a checkpoint that does not state them
is refused unless they are given.

Every importer returns ``(model, info)``; ``info`` is JSON-serialisable (so it can be handed to
:func:`save_model`) and says at least ``format``, ``source``, ``sha256`` of the weights file,
``spec_sources`` (field -> where it came from), ``unrecorded`` (the fields the checkpoint does
not record, so the caller's values were taken) and ``decoder_released``: when the checkpoint
carries no decoder (encoder-only releases), the model's decoder is freshly initialised from
``decoder_init_seed`` and must not be read as the released model's decoder.

Pickled files (``.pth``, ``.bin``, ``.pt``, ``.ckpt``) are read only through
``torch.load(..., weights_only=True)``, which lets through tensors, plain Python values and
:data:`SAFE_CONTAINERS`; a file that needs any other object is refused
(:class:`CheckpointRefusedError`) with torch's reason and instructions to convert it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import pickle
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mimia.models import build_model
from mimia.models.base import MIMModel
from mimia.models.spec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSpec,
    architecture,
    config_key,
    hf_fields,
    hf_mean_std,
    hf_spec,
    read_json,
    sidecar_path,
    spec_differences,
    spec_from_fields,
)
from mimia.provenance import InputChangedError, file_sha256, job_record, shown
from mimia.storage import atomic_path

__all__ = [
    "FORMATS",
    "SAFE_CONTAINERS",
    "CheckpointRefusedError",
    "check_weights",
    "file_sha256",
    "hf_spec",
    "import_checkpoint",
    "import_hf_vitmae",
    "import_mae_checkpoint",
    "import_timm_encoder",
    "infer_spec",
    "load_model",
    "read_sidecar",
    "read_weights",
    "save_model",
    "sidecar_path",
]

FORMATS = ("mimia", "timm", "mae", "hf")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Plain attribute containers that released checkpoints carry besides tensors: unpickling one
# only sets attributes, it cannot run code. (facebookresearch/mae saves its ``args`` so.)
SAFE_CONTAINERS: tuple[type, ...] = (argparse.Namespace,)

# facebookresearch/mae models_mae.py: every ``args.model`` it defines, and what it builds.
_DEC512D8B = {
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "decoder_embed_dim": 512,
    "decoder_depth": 8,
    "decoder_num_heads": 16,
    "norm_eps": 1e-6,  # norm_layer=partial(nn.LayerNorm, eps=1e-6)
}
OFFICIAL_MAE_MODELS: dict[str, dict[str, Any]] = {
    "mae_vit_base_patch16_dec512d8b": {
        "patch_size": 16,
        "embed_dim": 768,
        "depth": 12,
        "num_heads": 12,
        **_DEC512D8B,
    },
    "mae_vit_large_patch16_dec512d8b": {
        "patch_size": 16,
        "embed_dim": 1024,
        "depth": 24,
        "num_heads": 16,
        **_DEC512D8B,
    },
    "mae_vit_huge_patch14_dec512d8b": {
        "patch_size": 14,
        "embed_dim": 1280,
        "depth": 32,
        "num_heads": 16,
        **_DEC512D8B,
    },
}
for _name in list(OFFICIAL_MAE_MODELS):  # the "recommended" aliases, e.g. mae_vit_base_patch16
    OFFICIAL_MAE_MODELS[_name.removesuffix("_dec512d8b")] = OFFICIAL_MAE_MODELS[_name]

# Keys of a timm / official checkpoint that belong to a classifier, not the MIM encoder.
_HEAD_PREFIXES = ("head.", "fc_norm.")

Facts = dict[str, tuple[Any, str]]  # field -> (value, where it was read)


class CheckpointRefusedError(ValueError):
    """A pickled checkpoint that cannot be read without running arbitrary code."""


# -- mimia's own format ------------------------------------------------------------------------
def save_model(model: MIMModel, weights: str | Path, info: dict[str, Any] | None = None) -> None:
    """Write weights and sidecar atomically; the sidecar lands first, so weights imply it.

    The sidecar records the weights' sha256 and, in a workflow job, the job's code hash,
    commit and input hashes (the training shards'); ``sidecar_sha256`` covers the rest of
    the sidecar, so an edit to either file is found (:func:`check_weights`).
    """
    weights = Path(weights)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp_w:
        save_file(state, str(tmp_w))
        sidecar = {
            "spec": model.spec.to_dict(),
            "info": info or {},
            "weights_sha256": file_sha256(tmp_w),
            "provenance": job_record(),
        }
        sidecar["sidecar_sha256"] = _sidecar_sha256(sidecar)
        with atomic_path(sidecar_path(weights)) as tmp_j:
            tmp_j.write_text(json.dumps(sidecar, indent=2))


def _sidecar_sha256(sidecar: dict[str, Any]) -> str:
    rest = {k: v for k, v in sidecar.items() if k != "sidecar_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def check_weights(weights: str | Path, required: bool = True) -> None:
    """Refuse weights, or a sidecar, changed since :func:`save_model` wrote them: a model
    fetched from a shared cache is checked so before use, and the message names the cache
    file. ``required=False`` lets a sidecar that records no hash pass (a checkpoint from
    elsewhere, written before mimia recorded one)."""
    sidecar = read_sidecar(weights)
    recorded = sidecar.get("weights_sha256")
    if recorded is None and not required:
        return
    where = shown(sidecar_path(weights))
    if recorded is None:
        raise InputChangedError(
            f"sidecar {where} records no weights_sha256: the model was not written by this "
            f"version of mimia; delete it and rerun to train it again"
        )
    if sidecar.get("sidecar_sha256") != _sidecar_sha256(sidecar):
        raise InputChangedError(
            f"sidecar {where} was edited after it was written (its sidecar_sha256 does not "
            f"match its content); delete the model and rerun"
        )
    found = file_sha256(weights)
    if found != recorded:
        raise InputChangedError(
            f"weights {shown(weights)} have sha256 {found}, but their sidecar recorded "
            f"{recorded} when they were written: the file was replaced or changed since; "
            f"delete the model and rerun"
        )


def read_sidecar(weights: str | Path) -> dict[str, Any]:
    sidecar = read_json(sidecar_path(weights), f"checkpoint sidecar (expected beside {weights})")
    if not isinstance(sidecar, dict) or "spec" not in sidecar:
        raise ValueError(f"checkpoint sidecar {sidecar_path(weights)} holds no 'spec'")
    return sidecar


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as e:
        raise ValueError(
            f"cannot read safetensors file {path} ({path.stat().st_size} bytes): {e}; "
            f"the file is truncated or not a safetensors file"
        ) from None


def load_model(weights: str | Path, device: str = "cpu") -> MIMModel:
    weights = Path(weights)
    spec = ModelSpec.from_dict(read_sidecar(weights)["spec"])
    model = build_model(spec)
    _load_part(model, _load_safetensors(weights), f"checkpoint {weights}")
    return model.to(device).eval()


# -- reading foreign weight files ---------------------------------------------------------------
# torch's advice around the reason (re-run with weights_only=False, allow-list the global...)
# is for people who trust the file; mimia does not, so only the reason itself is kept.
_TORCH_BOILERPLATE = (
    "Weights only load failed",
    "Re-running `torch.load`",
    "(2) Alternatively",
    "Check the documentation of torch.load",
)


def torch_load_reason(err: BaseException) -> str:
    """What a failed ``torch.load`` says about the file, without torch's generic advice."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    kept = []
    for line in text.splitlines():
        line = line.strip()
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].strip()
        if line and not any(b in line for b in _TORCH_BOILERPLATE):
            kept.append(line)
    return " ".join(kept) or text.strip()


def read_weights(path: str | Path) -> Any:
    """The object stored in a safetensors or (tensor-only) pickled weights file.

    Pickles go through ``torch.load(weights_only=True)``, with :data:`SAFE_CONTAINERS` allowed
    for this call only; anything else that needs unpickling raises
    :class:`CheckpointRefusedError`, and a corrupt or truncated file a ValueError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _load_safetensors(path)
    if suffix not in PICKLE_SUFFIXES:
        raise ValueError(
            f"cannot read weights from {path}: expected .safetensors or a tensor-only pickle "
            f"({', '.join(PICKLE_SUFFIXES)})"
        )
    try:
        with torch.serialization.safe_globals(list(SAFE_CONTAINERS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = torch_load_reason(e)
        if "GLOBAL" not in reason:
            raise ValueError(
                f"cannot read checkpoint {path}: torch's weights-only loader fails on it "
                f"[torch: {reason}]; the file is corrupt or not written by torch.save"
            ) from None
        raise CheckpointRefusedError(
            f"checkpoint {path} is refused: it holds pickled objects other than tensors and "
            f"plain containers, which only arbitrary unpickling (running code from the file) "
            f"could load [torch: {reason}]. If you trust its source, convert it once, in a "
            f"sandbox, to safetensors and import that file instead, e.g.\n"
            f'  python -c "import torch; from safetensors.torch import save_file; '
            f"o = torch.load('{path}', map_location='cpu', weights_only=False); "
            f"sd = o.get('model', o.get('state_dict', o)); "
            f"save_file({{k: v.clone().contiguous() for k, v in sd.items()}}, "
            f"'{path.with_suffix('.safetensors')}')\""
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise ValueError(
            f"cannot read checkpoint {path} ({path.stat().st_size} bytes): {type(e).__name__}: {e}"
        ) from None


def _state_dict(obj: Any, path: Path, wrappers: Iterable[str] = ("model", "state_dict")) -> dict:
    """The ``{name: tensor}`` mapping in ``obj``, unwrapping ``{"model": ...}`` and the like."""
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in wrappers:
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                bad = sorted(k for k, v in inner.items() if not isinstance(v, torch.Tensor))
                if bad:
                    raise ValueError(f"{path}: {key!r} holds non-tensor entries {bad[:10]}")
                return dict(inner)
        raise ValueError(
            f"{path} holds no state dict: expected tensors or one of the keys "
            f"{list(wrappers)}, got keys {sorted(map(str, obj))[:20]}"
        )
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")


def _fmt_keys(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _load_part(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(sd, strict=True)`` with errors that name keys and shapes."""
    expected = module.state_dict()
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_fmt_keys(unexpected)}")
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes[:12]))
    if problems:
        raise ValueError(f"{what} does not fit the model: " + " | ".join(problems))
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True)


def _build(spec: ModelSpec, seed: int) -> MIMModel:
    """A freshly initialised model; parts the checkpoint lacks keep this seeded init."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(spec)


def _block_count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    ids = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    if ids and ids != set(range(max(ids) + 1)):
        raise ValueError(f"blocks {prefix}N are not numbered 0..{max(ids)}: {sorted(ids)}")
    return len(ids)


def _require(sd: Mapping[str, torch.Tensor], keys: Iterable[str], what: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ValueError(f"{what}: cannot infer the architecture, missing keys {missing}")


def weight_facts(sd: Mapping[str, torch.Tensor]) -> Facts:
    """Architecture fields that the tensor shapes of an official/timm state dict determine.

    Encoder keys are unprefixed (``patch_embed.proj.weight``, ``blocks.N...``); decoder keys,
    if any, as in facebookresearch/mae (``decoder_embed.weight``, ``decoder_blocks.N...``).
    """
    _require(sd, ["patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"], "encoder")
    embed_dim, in_chans, patch, patch_w = sd["patch_embed.proj.weight"].shape
    if patch != patch_w:
        raise ValueError(f"non-square patches {patch}x{patch_w} are not supported")
    n_pos = sd["pos_embed"].shape[1] - 1  # minus the cls position
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise ValueError(f"pos_embed has {n_pos} patch positions, not a square grid (+ cls)")
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    mlp_ratio = hidden / embed_dim
    if int(embed_dim * mlp_ratio) != hidden:
        raise ValueError(f"MLP width {hidden} is not representable as embed_dim * mlp_ratio")
    proj = "weights patch_embed.proj.weight"
    facts: Facts = {
        "embed_dim": (embed_dim, proj),
        "in_chans": (in_chans, proj),
        "patch_size": (patch, proj),
        "img_size": (grid * patch, "weights pos_embed and patch size"),
        "depth": (_block_count(sd, "blocks."), "weights blocks.N"),
        "mlp_ratio": (mlp_ratio, "weights blocks.0.mlp.fc1.weight"),
        "qkv_bias": ("blocks.0.attn.qkv.bias" in sd, "weights blocks.0.attn.qkv.bias"),
    }
    if "decoder_embed.weight" in sd:
        _require(sd, ["decoder_blocks.0.mlp.fc1.weight"], "decoder")
        dec_dim = sd["decoder_embed.weight"].shape[0]
        if sd["decoder_blocks.0.mlp.fc1.weight"].shape[0] != 4 * dec_dim:
            raise ValueError("mimia's MAE decoder has mlp_ratio 4; this checkpoint's differs")
        facts["decoder_embed_dim"] = (dec_dim, "weights decoder_embed.weight")
        facts["decoder_depth"] = (_block_count(sd, "decoder_blocks."), "weights decoder_blocks.N")
    return facts


def args_facts(args: Any) -> Facts:
    """Fields that an official training checkpoint's ``args`` state (its model name, flags)."""
    a = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    # argparse gives these types; any other (norm_pix_loss "False", which bool() makes True)
    # is a file edited or written by other code, and its facts cannot be read.
    for key, kind in (("model", str), ("norm_pix_loss", bool), ("input_size", int)):
        value = a.get(key)
        if value is not None and (type(value) is not kind):
            raise ValueError(
                f"checkpoint args.{key} is {value!r} ({type(value).__name__}), expected a "
                f"{kind.__name__} as facebookresearch/mae's argparse writes it"
            )
    facts: Facts = {}
    name = a.get("model")
    if name in OFFICIAL_MAE_MODELS:
        src = f"args.model={name!r} (models_mae.py)"
        facts |= {k: (v, src) for k, v in OFFICIAL_MAE_MODELS[name].items()}
    if a.get("norm_pix_loss") is not None:
        facts["norm_pix_loss"] = (a["norm_pix_loss"], "args.norm_pix_loss")
    if a.get("input_size") is not None:
        facts["img_size"] = (a["input_size"], "args.input_size")
    return facts


def _merge(facts: Facts, more: Facts, what: str) -> Facts:
    """Facts from two sources; where both speak they must agree."""
    out, clashes = dict(facts), []
    for k, (v, src) in more.items():
        if k not in out:
            out[k] = (v, src)
        elif out[k][0] != v:
            clashes.append(f"{k}: {out[k][1]} says {out[k][0]!r}, {src} says {v!r}")
        else:
            out[k] = (v, f"{out[k][1]}; {src}")
    if clashes:
        raise ValueError(f"{what} contradicts itself: " + "; ".join(clashes))
    return out


def checkpoint_facts(sd: Mapping[str, torch.Tensor], args: Any = None, what: str = "") -> Facts:
    """Everything a state dict (and official ``args``, if any) says about the architecture."""
    facts = weight_facts(sd)
    if args is not None:
        facts = _merge(facts, args_facts(args), what or "the checkpoint")
    return facts


def infer_spec(
    sd: Mapping[str, torch.Tensor],
    *,
    args: Any = None,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    norm_eps: float | None = None,
    norm_pix_loss: bool | None = None,
    what: str = "the checkpoint",
) -> tuple[ModelSpec, dict[str, str]]:
    """A MAE :class:`ModelSpec` from key names, tensor shapes and official ``args``.

    What neither tells (heads, LayerNorm eps, ``norm_pix_loss``) must be given, or this
    refuses; a given value that contradicts the checkpoint is refused too. Without decoder
    weights the fresh decoder gets ModelSpec's defaults. Returns the spec and, per field of
    :func:`~mimia.models.spec.architecture`, where its value came from.
    """
    facts = checkpoint_facts(sd, args, what)
    given = {
        "num_heads": num_heads,
        "decoder_num_heads": decoder_num_heads,
        "norm_eps": norm_eps,
        "norm_pix_loss": norm_pix_loss,
    }
    given = {k: v for k, v in given.items() if v is not None}
    facts = _merge(facts, {k: (v, "given") for k, v in given.items()}, what)
    has_decoder = "decoder_embed_dim" in facts
    needed = ["num_heads", "norm_eps"] + (["decoder_num_heads", "norm_pix_loss"] * has_decoder)
    missing = [k for k in needed if k not in facts]
    if missing:
        raise ValueError(
            f"cannot tell {', '.join(missing)} of {what}: its weights do not record "
            f"{'it' if len(missing) == 1 else 'them'}"
            f"{'' if args is not None else ' and it carries no official args'}, and mimia "
            f"does not guess. State {' and '.join(config_key(k) for k in missing)} in the "
            f"config (or pass {', '.join(f'{k}=...' for k in missing)})"
        )
    defaults = ModelSpec()
    for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads", "norm_pix_loss"):
        if k not in facts:
            facts[k] = (getattr(defaults, k), "default of the fresh decoder (none released)")
    spec = spec_from_fields({k: v for k, (v, _) in facts.items()})
    sources = {k: src for k, (_, src) in facts.items()}
    sources["recipe"] = "MAE state dict layout"
    sources["mean"] = sources["std"] = "ImageNet default (not recorded in the checkpoint)"
    return spec, sources


def _check_facts(
    facts: Facts,
    spec: ModelSpec,
    path: Path,
    fmt: str,
    stated: Iterable[str] | None = None,
    required: Iterable[str] = (),
) -> dict[str, str]:
    """Refuse a given spec that contradicts what the checkpoint says; sources per field.

    With ``stated`` (the fields the user wrote in the config), a ``required`` field that the
    checkpoint does not record must be one of them: a default is refused, naming the keys.
    """
    arch, unset = architecture(spec), object()
    diffs = []
    for k, (v, src) in sorted(facts.items(), key=lambda kv: config_key(kv[0])):
        mine = arch.get(k, unset)
        if mine != v:
            shown = "(not set)" if mine is unset else repr(mine)
            diffs.append(f"{config_key(k)}: checkpoint {v!r} ({src}), config {shown}")
    if diffs:
        raise ValueError(_mismatch(path, fmt, diffs))
    if stated is None:
        return {k: facts[k][1] if k in facts else "given (spec)" for k in arch}
    stated = set(stated)
    missing = [k for k in required if k in arch and k not in facts and k not in stated]
    if missing:
        keys = ", ".join(config_key(k) for k in missing)
        raise ValueError(
            f"{fmt} checkpoint {path} does not record {keys}, and the experiment does not "
            f"write {'it' if len(missing) == 1 else 'them'}: the values would be the schema's "
            f"defaults, and mimia does not guess the audited target's architecture. Write "
            f"{keys} in the experiment's model section"
        )
    return {
        k: facts[k][1]
        if k in facts
        else f"user's config ({config_key(k)})"
        if k in stated
        else f"default ({config_key(k)} not written)"
        for k in arch
    }


def _mismatch(path: Path, fmt: str, diffs: list[str]) -> str:
    return (
        f"target checkpoint {path} (format {fmt}) does not match the model spec it was given "
        f"(the experiment's model section): {'; '.join(diffs)}. The checkpoint is the audited "
        f"target, so it wins: change the model section to describe it (the shadow models are "
        f"built from that section and must have the target's architecture)"
    )


def log_architecture(what: str, spec: ModelSpec, sources: Mapping[str, str]) -> None:
    """Print each architecture field and where it came from, to stderr (the job's log)."""
    arch = architecture(spec)
    lines = [f"architecture of {what}:"]
    width = max(len(f"{config_key(k)} = {v!r}") for k, v in arch.items())
    for k in sorted(arch, key=config_key):
        field = f"{config_key(k)} = {arch[k]!r}"
        lines.append(f"  {field:<{width}}  <- {sources.get(k, 'given (config)')}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def _no_arch_kwargs(spec: ModelSpec | None, **kwargs: Any) -> None:
    given = sorted(k for k, v in kwargs.items() if v is not None)
    if spec is not None and given:
        raise TypeError(f"give either spec or {', '.join(given)}, not both")


def _split_head(sd: Mapping[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """Drop classifier keys (``head.*``, ``fc_norm.*``), returning what was dropped."""
    kept = {k: v for k, v in sd.items() if not k.startswith(_HEAD_PREFIXES)}
    return kept, sorted(set(sd) - set(kept))


def _hint_finetuned(sd: Mapping[str, torch.Tensor], ignored: list[str]) -> str:
    if "norm.weight" not in sd and any(k.startswith("fc_norm.") for k in ignored):
        return (
            " (this looks like a fine-tuned classifier with global pooling: its final norm is "
            "fc_norm, not the pre-training encoder's norm; import the pre-trained checkpoint)"
        )
    return ""


def _unrecorded(spec: ModelSpec, facts: Mapping[str, Any]) -> list[str]:
    """Architecture fields the checkpoint does not record: the user's or defaults (for
    :mod:`mimia.models.plausibility`, which can test heads and eps against a decoder)."""
    # The recipe is the state dict's layout, which the importer chose by it.
    return sorted(k for k in architecture(spec) if k not in facts and k != "recipe")


def _base_info(fmt: str, path: Path, weights: Path, seed: int) -> dict[str, Any]:
    return {
        "format": fmt,
        "source": str(path),
        "weights_file": str(weights),
        "sha256": file_sha256(weights),
        "decoder_init_seed": seed,
    }


def _resolve_spec(
    sd: Mapping[str, torch.Tensor],
    spec: ModelSpec | None,
    path: Path,
    fmt: str,
    args: Any = None,
    ignore: Iterable[str] = (),
    stated: Iterable[str] | None = None,
    **given: Any,
) -> tuple[ModelSpec, dict[str, str]]:
    """The spec to build (inferred, or the given one checked against the checkpoint)."""
    what = f"{fmt} checkpoint {path}"
    if spec is None:
        if stated is not None:
            raise TypeError("stated goes with a spec: it says which of its fields were written")
        spec, sources = infer_spec(sd, args=args, what=what, **given)
    else:
        _no_arch_kwargs(spec, **given)
        facts = checkpoint_facts(sd, args, what)
        ignore = set(ignore)
        # Heads and eps always shape the encoder; the decoder's only where it is used.
        required = ["num_heads", "norm_eps"]
        if "decoder_embed_dim" in facts and "decoder_embed_dim" not in ignore:
            required += ["decoder_num_heads", "norm_pix_loss"]
        kept = {k: facts[k] for k in facts if k not in ignore}
        sources = _check_facts(kept, spec, path, fmt, stated, required)
    log_architecture(what, spec, sources)
    return spec, sources


# -- timm ---------------------------------------------------------------------------------------
def import_timm_encoder(
    path: str | Path,
    spec: ModelSpec | None = None,
    *,
    num_heads: int | None = None,
    norm_eps: float | None = None,
    seed: int = 0,
    ignore: Iterable[str] = (),
    stated: Iterable[str] | None = None,
) -> tuple[MIMModel, dict[str, Any]]:
    """A model whose encoder holds a timm ViT state dict; its decoder is not released.

    ``head.*``/``fc_norm.*`` keys are ignored (listed in ``info["ignored_keys"]``); any other
    key the encoder lacks, or lacks from the file, or a shape mismatch, is a ValueError. Without
    ``spec`` a MAE spec is inferred from the shapes, given ``num_heads`` and ``norm_eps``.
    ``stated`` (with ``spec``): the spec's fields the user wrote; heads and eps must be among
    them, as a timm file records neither.
    """
    path = Path(path)
    sd, ignored = _split_head(_state_dict(read_weights(path), path))
    spec, sources = _resolve_spec(
        sd,
        spec,
        path,
        "timm",
        ignore=ignore,
        stated=stated,
        num_heads=num_heads,
        norm_eps=norm_eps,
    )
    model = _build(spec, seed)
    _load_part(model.encoder, sd, f"timm encoder {path}" + _hint_finetuned(sd, ignored))
    info = _base_info("timm", path, path, seed) | {
        "decoder_released": False,
        "ignored_keys": ignored,
        "spec_sources": sources,
        "unrecorded": _unrecorded(spec, checkpoint_facts(sd)),
    }
    return model.eval(), info


# -- facebookresearch/mae ---------------------------------------------------------------------
_MAE_DECODER_PREFIXES = ("decoder_", "mask_token")


def _plain_args(args: Any) -> dict[str, Any]:
    """The JSON-representable entries of an official ``args``, for provenance."""
    a = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {k: v for k, v in a.items() if isinstance(v, str | int | float | bool | type(None))}


def import_mae_checkpoint(
    path: str | Path,
    spec: ModelSpec | None = None,
    *,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    norm_eps: float | None = None,
    norm_pix_loss: bool | None = None,
    seed: int = 0,
    ignore: Iterable[str] = (),
    stated: Iterable[str] | None = None,
) -> tuple[MIMModel, dict[str, Any]]:
    """An official facebookresearch/mae checkpoint: a release or ``checkpoint-N.pth``.

    Encoder keys (``cls_token``, ``pos_embed``, ``patch_embed.*``, ``blocks.*``, ``norm.*``)
    go to ``model.encoder``; ``mask_token`` and ``decoder_*`` to ``model.decoder``. Without
    decoder keys (the encoder-only ``mae_pretrain_vit_*.pth`` releases) the decoder stays
    freshly initialised and ``info["decoder_released"]`` is False. A training checkpoint's
    ``args`` say ``norm_pix_loss``, the image size and, for the official ``args.model`` names,
    heads and LayerNorm eps; a release says none of these, so they must be given (or ``spec``;
    with ``stated``, the spec's fields the user wrote, they must be among those). With the
    decoder's fields in ``ignore`` (the encoder-only decoder modes) the checkpoint's decoder is
    left out, whatever its shape: ``info["decoder_ignored"]``.
    """
    path = Path(path)
    obj = read_weights(path)
    args = obj.get("args") if isinstance(obj, Mapping) else None
    if not isinstance(args, argparse.Namespace | Mapping):
        args = None
    sd, ignored = _split_head(_state_dict(obj, path))
    spec, sources = _resolve_spec(
        sd,
        spec,
        path,
        "mae",
        args,
        ignore=ignore,
        stated=stated,
        num_heads=num_heads,
        decoder_num_heads=decoder_num_heads,
        norm_eps=norm_eps,
        norm_pix_loss=norm_pix_loss,
    )
    if spec.recipe != "mae":
        raise ValueError(f"an official MAE checkpoint needs recipe 'mae', got {spec.recipe!r}")
    enc = {k: v for k, v in sd.items() if not k.startswith(_MAE_DECODER_PREFIXES)}
    dec = {k: v for k, v in sd.items() if k.startswith(_MAE_DECODER_PREFIXES)}
    decoder_ignored = bool(dec) and "decoder_embed_dim" in set(ignore)
    if decoder_ignored:
        dec = {}
    model = _build(spec, seed)
    _load_part(model.encoder, enc, f"MAE encoder {path}" + _hint_finetuned(sd, ignored))
    if dec:
        _load_part(model.decoder, dec, f"MAE decoder {path}")
    info = _base_info("mae", path, path, seed) | {
        "decoder_released": bool(dec),
        "decoder_ignored": decoder_ignored,
        "ignored_keys": ignored,
        "spec_sources": sources,
        "unrecorded": _unrecorded(spec, checkpoint_facts(sd, args)),
    }
    if args is not None:
        info["official_args"] = _plain_args(args)
    if isinstance(obj, Mapping) and isinstance(obj.get("epoch"), int):
        info["epoch"] = obj["epoch"]
    return model.eval(), info


# -- HuggingFace ViTMAE -----------------------------------------------------------------------
# Module paths inside one HF ViTMAELayer, in the legacy layout that save_pretrained writes and
# the hub holds, and in transformers v5's in-memory layout.
_HF_LAYER_PARTS = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc2": "mlp.fc2",
}
_HF_FIXED = {
    "vit.embeddings.cls_token": "encoder.cls_token",
    "vit.embeddings.position_embeddings": "encoder.pos_embed",
    "vit.embeddings.patch_embeddings.projection.weight": "encoder.patch_embed.proj.weight",
    "vit.embeddings.patch_embeddings.projection.bias": "encoder.patch_embed.proj.bias",
    "vit.layernorm.weight": "encoder.norm.weight",
    "vit.layernorm.bias": "encoder.norm.bias",
    "decoder.mask_token": "decoder.mask_token",
    "decoder.decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder.decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder.decoder_embed.bias": "decoder.decoder_embed.bias",
    "decoder.decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder.decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder.decoder_pred.bias": "decoder.decoder_pred.bias",
}
# Encoder layers: vit.encoder.layer.N (legacy) or vit.layers.N (v5). Decoder layers:
# decoder.decoder_layers.N (hub), or decoder.decoder_encoder.layer.N, which transformers 5's
# save_pretrained writes by reverse-applying ViTModel's "encoder.layer." -> "layers." renaming.
_HF_LAYER = re.compile(
    r"^(?:vit\.(?:encoder\.layer|layers)|decoder\.(?:decoder_layers|decoder_encoder\.layer))"
    r"\.(\d+)\.(.+)\.(weight|bias)$"
)


def _hf_to_mimia(sd: Mapping[str, torch.Tensor], qkv_bias: bool) -> dict[str, torch.Tensor]:
    """HF ViTMAE names -> mimia names, fusing query/key/value into timm's ``qkv``."""
    if not any(k.startswith(("vit.", "decoder.")) for k in sd):  # a bare ViTMAEModel
        sd = {f"vit.{k}": v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        if key in _HF_FIXED:
            out[_HF_FIXED[key]] = value
            continue
        m = _HF_LAYER.match(key)
        part = _HF_LAYER_PARTS.get(m.group(2)) if m else None
        if m is None or part is None:
            unknown.append(key)
            continue
        block = (
            f"encoder.blocks.{m.group(1)}"
            if key.startswith("vit.")
            else f"decoder.decoder_blocks.{m.group(1)}"
        )
        if part in ("q", "k", "v"):
            qkv.setdefault((f"{block}.attn.qkv", m.group(3)), {})[part] = value
        else:
            out[f"{block}.{part}.{m.group(3)}"] = value
    if unknown:
        raise ValueError(f"unrecognised HuggingFace ViTMAE keys: {_fmt_keys(unknown)}")
    for (name, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{name}.{kind}: query/key/value incomplete, found {sorted(parts)}")
        out[f"{name}.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if not qkv_bias:  # timm blocks carry a qkv bias: zeros compute the same function
        for (name, kind), parts in list(qkv.items()):
            if kind == "weight" and f"{name}.bias" not in out:
                out[f"{name}.bias"] = parts["q"].new_zeros(3 * parts["q"].shape[0])
    return out


def _hf_weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.index.json")):
        raise ValueError(f"{folder}: sharded HF checkpoints are not supported; merge the shards")
    raise FileNotFoundError(f"{folder} holds neither model.safetensors nor pytorch_model.bin")


def import_hf_vitmae(
    folder: str | Path,
    *,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    seed: int = 0,
) -> tuple[MIMModel, dict[str, Any]]:
    """A ``ViTMAEForPreTraining.save_pretrained`` folder, without importing transformers.

    The spec comes from config.json (``layer_norm_eps`` is ``norm_eps``; keys it leaves out
    take ViTMAEConfig's defaults, as transformers does); weights from model.safetensors or
    pytorch_model.bin (tensor-only). HuggingFace normalises pixels outside the model: mean/std
    are preprocessor_config.json's if the folder has one, else the given ones, else ImageNet's.
    A bare ``ViTMAEModel`` (no decoder) imports with ``decoder_released`` False; position
    embeddings absent from the file get the fixed sin-cos ones (``info["sincos_filled"]``).
    mimia images correspond to HF's ``pixel_values * std + mean``.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not folder.exists():
        raise FileNotFoundError(f"HF checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"HF checkpoint {folder} must be a save_pretrained folder")
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: not a save_pretrained folder")
    config = read_json(config_path, "HF config")
    facts = hf_fields(config)
    declared = hf_mean_std(folder)
    if declared is not None:
        for name, given, value in zip(("mean", "std"), (mean, std), declared, strict=True):
            if given is not None and tuple(given) != value:
                raise ValueError(
                    f"{folder}/preprocessor_config.json says image_{name} {list(value)}, "
                    f"but {name} {list(given)} was given (the config's model.{name})"
                )
        mean, std = declared
        mean_src = "preprocessor_config.json image_mean/image_std"
    elif mean is not None and std is not None:
        mean_src = "given"
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        mean_src = "ImageNet default (the folder has no preprocessor_config.json)"
    spec = spec_from_fields({k: v for k, (v, _) in facts.items()}, mean=mean, std=std)
    sources = {k: src for k, (_, src) in facts.items()}
    sources |= {"recipe": "ViTMAEForPreTraining", "mean": mean_src, "std": mean_src}
    sources["qkv_bias"] = "config.json qkv_bias (zero biases stand in for absent ones)"
    log_architecture(f"hf checkpoint {folder}", spec, sources)
    weights = _hf_weights_file(folder)
    sd = _hf_to_mimia(_state_dict(read_weights(weights), weights), config.get("qkv_bias", True))
    enc = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
    dec = {k.removeprefix("decoder."): v for k, v in sd.items() if k.startswith("decoder.")}
    model = _build(spec, seed)
    # Fixed sin-cos position embeddings that a file leaves out are mimia's own, which equal
    # HF's (the same [w | h] layout as the original MAE).
    fixed = []
    if "pos_embed" not in enc:
        enc["pos_embed"] = model.encoder.pos_embed.detach().clone()
        fixed.append("encoder.pos_embed")
    if dec and "decoder_pos_embed" not in dec:
        dec["decoder_pos_embed"] = model.decoder.decoder_pos_embed.detach().clone()
        fixed.append("decoder.decoder_pos_embed")
    _load_part(model.encoder, enc, f"HF ViTMAE encoder {weights}")
    if dec:
        _load_part(model.decoder, dec, f"HF ViTMAE decoder {weights}")
    info = _base_info("hf", folder, weights, seed) | {
        "decoder_released": bool(dec),
        "config_sha256": file_sha256(config_path),
        "hf_mask_ratio": config.get("mask_ratio"),
        "ignored_keys": [],
        "spec_sources": sources,
        "sincos_filled": fixed,
        "unrecorded": _unrecorded(
            spec, facts if declared is None else {**facts, "mean": mean, "std": std}
        ),
    }
    return model.eval(), info


# -- one entry point ----------------------------------------------------------------------------
def import_checkpoint(
    path: str | Path,
    format: str,
    spec: ModelSpec | None = None,
    *,
    ignore: Iterable[str] = (),
    **kwargs: Any,
) -> tuple[MIMModel, dict[str, Any]]:
    """Build a mimia model from released weights at a local ``path``: ``(model, info)``.

    ``format`` is one of :data:`FORMATS`. ``spec`` fixes what the checkpoint does not say;
    whatever it does say (tensor shapes, official args, config.json, the sidecar) must agree
    with ``spec``, else a ValueError lists the differences (but for the fields in
    ``ignore``, e.g. the decoder's where the target's decoder is not used). For ``hf`` the
    spec's mean/std are used unless the folder states its own. Extra keyword arguments go to
    the format's importer (``num_heads=``, ``norm_eps=``, ``seed=``, ...).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; expected one of {FORMATS}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if format == "timm":
        return import_timm_encoder(path, spec, ignore=ignore, **kwargs)
    if format == "mae":
        return import_mae_checkpoint(path, spec, ignore=ignore, **kwargs)
    if format == "hf":
        if spec is not None:
            kwargs = {"mean": spec.mean, "std": spec.std, **kwargs}
        model, info = import_hf_vitmae(path, **kwargs)
    else:
        if kwargs:
            raise TypeError(f"format 'mimia' takes no options, got {sorted(kwargs)}")
        sidecar = read_sidecar(path)
        model = load_model(path)
        sources = dict.fromkeys(architecture(model.spec), f"sidecar {sidecar_path(path)}")
        log_architecture(f"mimia checkpoint {path}", model.spec, sources)
        info = {
            "format": "mimia",
            "source": str(path),
            "weights_file": str(path),
            "sha256": file_sha256(path),
            "decoder_released": bool(sidecar.get("info", {}).get("decoder_released", True)),
            "sidecar_info": sidecar.get("info", {}),
            "spec_sources": sources,
            "unrecorded": [],
        }
    if spec is not None:
        diffs = spec_differences(model.spec, spec, ignore=ignore)
        if diffs:
            raise ValueError(_mismatch(path, format, diffs))
    return model, info
