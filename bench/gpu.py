"""One prepared check of every CUDA path of mimia against its float32 / CPU counterpart.

    python bench/gpu.py --out gpu.json               # on a GPU machine: <= 8 min on one H100/H200
    python bench/gpu.py --device cpu --out smoke.json  # smoke mode: tiny sizes, every CPU branch

Sections (``--sections`` to run some; each is timed, and one that crashes is recorded and does
not stop the others):

* ``train``   MAE steps of ViT-S/4 at 32 px and ViT-B/16 at 224 px, bf16 autocast vs float32
  from the same weights, data and masks: per-step loss agreement, images/s, TFLOP/s.
* ``compile`` ``torch.compile`` on vs off (bf16, ViT-S/4): same losses, speed.
* ``extract`` ``score_batch`` bf16 vs float32 on the same images and masks: Spearman, max
  relative error, threshold-attack AUC on a member/non-member set under both (difference vs the
  bootstrap CI); image-masks/s of ViT-B/16.
* ``extract_bench`` ``bench/extract.py --device cuda``: mimia vs naive HF vs ceiling ratios.
* ``ddp``     ``pretrain.devices`` through mimia's launcher: two NCCL processes where two GPUs
  exist, else a world of size one (gloo on the CPU), against the one-process run.
* ``workflow`` the tiny workflow with ``gpu: 1`` (and ``gpu_share: 4``) against a CPU run of
  the same config: every summary AUC within its bootstrap CI's half-width.
* ``share``   models trained per hour with 1, 2, 4 concurrent training jobs on one device.

Exit status 0 when every check passes, 1 otherwise; the JSON record is written either way.
Tolerances and their reasons: bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT / "src"))

from extract import SPEC as VIT_B_224  # noqa: E402  (bench/extract.py's ViT-B/16 MAE)
from extract import SmoothSource  # noqa: E402

from mimia.devices import process_group_backend  # noqa: E402
from mimia.metrics import auc, bootstrap_metrics  # noqa: E402
from mimia.models import ModelSpec, build_model  # noqa: E402
from mimia.models.scoring import score_batch  # noqa: E402
from mimia.training import TrainConfig, train_mim  # noqa: E402
from mimia.training.launch import launch  # noqa: E402  (the launcher behind pretrain.devices)

# -- tolerances (reasons in bench/README.md) ----------------------------------------------------
LOSS_RTOL = 0.02  # per-step training loss, bf16 vs float32 and compiled vs eager
ERROR_RTOL = 0.02  # per (image, mask) reconstruction error, bf16 vs float32
MIN_SPEARMAN = 0.999  # rank correlation of per-image mean errors, bf16 vs float32
AUC_CI_SHARE = 0.1  # |AUC bf16 - AUC float32| <= this share of the bootstrap CI's width
SECTIONS = ("train", "compile", "extract", "extract_bench", "ddp", "workflow", "share")

VIT_S_32 = dict(
    recipe="mae",
    encoder="vit_small_patch16_224",
    img_size=32,
    patch_size=4,
    decoder_embed_dim=256,
    decoder_depth=4,
    decoder_num_heads=8,
)
TINY = dict(
    recipe="mae",
    encoder="vit_tiny_patch16_224",
    encoder_overrides={"embed_dim": 32, "depth": 1, "num_heads": 2},
    img_size=16,
    patch_size=4,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=2,
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one mode runs: the GPU sizes, or tiny ones for the CPU smoke mode."""

    train: dict  # name -> (spec dict, batch, steps)
    compile_model: str
    member_spec: dict
    members: int
    member_epochs: int
    masks: int
    score_spec: dict
    score_images: int
    extract_bench_args: tuple[str, ...]
    share_jobs: tuple[int, ...]
    share_steps: int
    share_batch: int
    workflow_model: dict
    workflow_epochs: int


GPU_SIZES = Sizes(
    train={"vit-s/4@32": (VIT_S_32, 256, 30), "vit-b/16@224": (VIT_B_224, 64, 20)},
    compile_model="vit-s/4@32",
    member_spec=VIT_S_32,
    members=64,
    member_epochs=300,
    masks=8,
    score_spec=VIT_B_224,
    score_images=64,
    extract_bench_args=tuple(
        "--images 1024 --masks 4 --batch 64 --shard-size 256 --workers 4 --no-rss".split()
    ),
    share_jobs=(1, 2, 4),
    share_steps=100,
    share_batch=256,
    workflow_model={
        "encoder_overrides": {"embed_dim": 64, "depth": 2, "num_heads": 2},
        "patch_size": 4,
        "decoder_embed_dim": 32,
        "decoder_depth": 1,
        "decoder_num_heads": 2,
    },
    workflow_epochs=20,
)
CPU_SIZES = Sizes(
    train={"tiny-a": (TINY, 8, 3), "tiny-b": ({**TINY, "recipe": "simmim"}, 8, 3)},
    compile_model="tiny-a",
    member_spec=TINY,
    members=16,
    member_epochs=20,
    masks=2,
    score_spec=TINY,
    score_images=8,
    extract_bench_args=tuple(
        "--images 2 --masks 1 --batch 2 --shard-size 2 --threads 1 --workers 0 --no-rss".split()
    ),
    share_jobs=(1, 2),
    share_steps=3,
    share_batch=8,
    workflow_model={
        "encoder_overrides": {"embed_dim": 32, "depth": 1, "num_heads": 2},
        "patch_size": 4,
        "decoder_embed_dim": 32,
        "decoder_depth": 1,
        "decoder_num_heads": 2,
    },
    workflow_epochs=2,
)


# -- helpers ------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` smooth random images (bench/extract.py's source), uint8 ``[n, 3, size, size]``."""
    src = SmoothSource(seed)
    return torch.stack([torch.from_numpy(src.image(i, size)).permute(2, 0, 1) for i in range(n)])


def float32_reference() -> None:
    """Plain float32 on CUDA: no TF32 in matmuls or convolutions (torch allows TF32 in cuDNN
    convolutions by default, which would make the 'float32' reference a 10-bit one)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def train_cfg(steps: int, batch: int, device: str, **kw) -> TrainConfig:
    """One optimiser step per epoch (the data set is one batch), so the per-epoch history is
    the per-step loss trajectory; no warm-up, augmentation off: the same masks in every run."""
    section = {"epochs": steps, "batch_size": batch, "warmup_epochs": 0, "blr": 1.5e-4}
    return dataclasses.replace(
        TrainConfig.from_section(section | {"augment": False}, seed=0, device=device), **kw
    )


def train_flops(spec: ModelSpec, batch: int, device: torch.device) -> int:
    """FLOPs of one training step's forward + backward (torch.utils.flop_counter: matrix
    products, convolutions, attention; element-wise ops and the AdamW update not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mimia.masking import random_masks

    model = build_model(spec).to(device)
    x = torch.rand(batch, 3, spec.img_size, spec.img_size, device=device)
    mask = random_masks(batch, spec.num_patches, 0.75, block_size=spec.mask_block).to(device)
    with FlopCounterMode(display=False) as counter:
        model(x, mask)[0].mean().backward()
    return int(counter.get_total_flops())


def run_training(spec_dict, batch, steps, device, state, data, **kw):
    """A training run from ``state``; per-step losses and seconds (first 20 % dropped)."""
    spec = ModelSpec(**spec_dict)
    model = build_model(spec)
    model.load_state_dict(state)
    cfg = train_cfg(steps, batch, str(device), **kw)
    t0 = time.perf_counter()
    history = train_mim(model, data, cfg)
    wall = time.perf_counter() - t0
    losses = [h["loss"] for h in history]
    timed = [h["seconds"] for h in history][max(1, steps // 5) :]
    step_s = statistics.median(timed)
    return {"losses": losses, "step_s": step_s, "images_per_s": batch / step_s, "wall_s": wall}


def max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.abs(a)))


# -- sections -----------------------------------------------------------------------------------
def section_train(args, sizes: Sizes, device, out: dict) -> list[str]:
    fails = []
    for name, (spec_dict, batch, steps) in sizes.train.items():
        spec = ModelSpec(**spec_dict)
        torch.manual_seed(0)
        state = build_model(spec).state_dict()
        data = images(batch, spec.img_size, seed=1)
        flops = train_flops(spec, batch, device)
        runs = {
            p: run_training(spec_dict, batch, steps, device, state, data, precision=p)
            for p in ("fp32", "bf16")
        }
        gap = max_rel(runs["fp32"]["losses"], runs["bf16"]["losses"])
        ok = gap <= LOSS_RTOL
        fails += [] if ok else [f"train {name}: bf16 vs fp32 loss gap {gap:.3g}"]
        out[name] = {
            "batch": batch,
            "steps": steps,
            "flops_per_step": flops,
            "loss_gap_rel": gap,
            "ok": ok,
            **{p: r | {"tflops": flops / r["step_s"] / 1e12} for p, r in runs.items()},
        }
    return fails


def section_compile(args, sizes: Sizes, device, out: dict) -> list[str]:
    if device.type == "cpu" and not args.cpu_compile:
        # Inductor's C++ build of even a tiny model took over 14 minutes on a loaded 2-core
        # machine: the smoke mode leaves it out unless asked.
        out["skipped"] = "torch.compile on the CPU (inductor's C++ build): --cpu-compile"
        return []
    spec_dict, batch, steps = sizes.train[sizes.compile_model]
    spec = ModelSpec(**spec_dict)
    torch.manual_seed(0)
    state = build_model(spec).state_dict()
    data = images(batch, spec.img_size, seed=1)
    steps = max(steps, 10) if device.type == "cuda" else steps
    eager = run_training(spec_dict, batch, steps, device, state, data, precision="auto")
    compiled = run_training(
        spec_dict, batch, steps, device, state, data, precision="auto", compile=True
    )
    gap = max_rel(eager["losses"], compiled["losses"])
    ok = gap <= LOSS_RTOL
    out.update(
        model=sizes.compile_model,
        eager=eager,
        compiled=compiled,
        loss_gap_rel=gap,
        speedup=compiled["images_per_s"] / eager["images_per_s"],
        compile_s=compiled["wall_s"] - steps * compiled["step_s"],
        ok=ok,
    )
    return [] if ok else [f"compile: compiled vs eager loss gap {gap:.3g}"]


def _scores(model, imgs, ids, masks, precision, device):
    res = score_batch(model, imgs, ids, 0, 0.75, masks, precision=precision)
    sync(device)
    return res["error"].numpy()


def section_extract(args, sizes: Sizes, device, out: dict) -> list[str]:
    from scipy.stats import spearmanr

    fails = []
    # A member / non-member set: a model trained (bf16 on CUDA) on the members until it
    # remembers them, scored under both precisions with the same masks.
    spec = ModelSpec(**sizes.member_spec)
    n = sizes.members
    data = images(2 * n, spec.img_size, seed=7)
    torch.manual_seed(0)
    model = build_model(spec)
    cfg = TrainConfig.from_section(
        {"epochs": sizes.member_epochs, "batch_size": min(32, n), "warmup_epochs": 1}
        | {"blr": 1e-3, "augment": False},
        seed=0,
        device=str(device),
    )
    train_mim(model, data[:n], cfg)
    model.to(device).eval()
    ids = [f"m{i}" for i in range(n)] + [f"n{i}" for i in range(n)]
    labels = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    errors = {p: _scores(model, data, ids, sizes.masks, p, device) for p in ("fp32", "bf16")}
    per_image = {p: e.mean(1) for p, e in errors.items()}
    aucs = {p: auc(labels, -s) for p, s in per_image.items()}
    boot = bootstrap_metrics(labels, -per_image["fp32"], threshold=0.0, n_bootstrap=1000)
    lo, hi = (float(q) for q in np.percentile(boot["auc"], [2.5, 97.5]))
    rel = max_rel(errors["fp32"], errors["bf16"])
    rho = float(spearmanr(per_image["fp32"], per_image["bf16"]).statistic)
    auc_gap = abs(aucs["bf16"] - aucs["fp32"])
    checks = {
        "max_rel_error": rel <= ERROR_RTOL,
        "spearman": rho >= MIN_SPEARMAN,
        "auc_vs_ci": auc_gap <= AUC_CI_SHARE * (hi - lo),
    }
    fails += [f"extract members: {k} failed" for k, ok in checks.items() if not ok]
    out["members"] = {
        "model": sizes.member_spec.get("encoder"),
        "images": 2 * n,
        "masks": sizes.masks,
        "max_rel_error": rel,
        "spearman": rho,
        "auc": aucs,
        "auc_ci95_fp32": [lo, hi],
        "auc_gap": auc_gap,
        "checks": checks,
    }

    # Throughput and agreement of the paper-scale model (random weights).
    spec = ModelSpec(**sizes.score_spec)
    torch.manual_seed(0)
    model = build_model(spec).to(device).eval()
    m = sizes.score_images
    data = images(m, spec.img_size, seed=9)
    ids = [f"s{i}" for i in range(m)]
    res = {}
    for p in ("fp32", "bf16"):
        _scores(model, data[:2], ids[:2], sizes.masks, p, device)  # warm-up
        t0 = time.perf_counter()
        errs = _scores(model, data, ids, sizes.masks, p, device)
        res[p] = {"pairs_per_s": m * sizes.masks / (time.perf_counter() - t0), "errors": errs}
    rel = max_rel(res["fp32"]["errors"], res["bf16"]["errors"])
    rho = float(spearmanr(res["fp32"]["errors"].ravel(), res["bf16"]["errors"].ravel()).statistic)
    ok = rel <= ERROR_RTOL and rho >= MIN_SPEARMAN
    fails += [] if ok else [f"extract {spec.encoder}: rel {rel:.3g}, spearman {rho:.4f}"]
    out["throughput"] = {
        "model": sizes.score_spec.get("encoder"),
        "img_size": spec.img_size,
        "images": m,
        "masks": sizes.masks,
        "max_rel_error": rel,
        "spearman": rho,
        "ok": ok,
        **{p: {"pairs_per_s": r["pairs_per_s"]} for p, r in res.items()},
    }
    return fails


def section_extract_bench(args, sizes: Sizes, device, out: dict) -> list[str]:
    cmd = [sys.executable, str(BENCH / "extract.py"), "--device", device.type]
    cmd += list(sizes.extract_bench_args)
    src = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": src}  # bench/extract.py imports mimia from src/ too
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    out["command"] = " ".join(cmd[1:])
    out["stdout_tail"] = run.stdout[-3000:]
    if run.returncode:
        return [f"extract_bench: exit {run.returncode}: {run.stderr[-1500:]}"]
    for key, pattern in (
        ("mimia_over_naive", r"mimia / naive\s+=\s+([\d.]+)x"),
        ("mimia_over_ceiling", r"mimia / ceiling\s+=\s+([\d.]+)"),
        ("bf16_vs_fp32_max_rel", r"max rel\. diff ([\d.e+-]+)"),
    ):
        match = re.search(pattern, run.stdout)
        out[key] = float(match.group(1)) if match else None
    for path in ("mimia", "naive", "ceiling"):
        match = re.search(rf"^{path}\s+[\d.]+\s+([\d.]+)", run.stdout, re.M)
        out[f"{path}_pairs_per_s"] = float(match.group(1)) if match else None
    missing = [k for k, v in out.items() if v is None]
    return [f"extract_bench: could not read {missing} from its output"] if missing else []


def section_ddp(args, sizes: Sizes, device, out: dict) -> list[str]:
    spec_dict, batch, steps = sizes.train[sizes.compile_model]
    spec = ModelSpec(**spec_dict)
    procs = min(2, torch.cuda.device_count()) if device.type == "cuda" else 1
    torch.manual_seed(0)
    state = build_model(spec).state_dict()
    data = images(batch, spec.img_size, seed=1)
    one = run_training(spec_dict, batch, steps, device, state, data)
    model = build_model(spec)
    model.load_state_dict(state)
    cfg = train_cfg(steps, batch // procs, str(device), devices=procs)
    t0 = time.perf_counter()
    # Through the launcher itself: train_mim calls it only for devices > 1.
    history = launch(model, data, cfg)
    wall = time.perf_counter() - t0
    losses = [h["loss"] for h in history]
    gap = max_rel(one["losses"], losses)
    ok = gap <= LOSS_RTOL
    out.update(
        processes=procs,
        backend=process_group_backend(device),
        loss_gap_rel=gap,
        wall_s=wall,
        one_process_wall_s=one["wall_s"],
        ok=ok,
    )
    return [] if ok else [f"ddp: {procs} processes vs one: loss gap {gap:.3g}"]


def _workflow_config(sizes: Sizes, device) -> dict:
    roles = ("target_member", "target_nonmember", "shadow_member", "shadow_nonmember")
    return {
        "defaults": {
            "seed": 1,
            "dataset": {"name": "digits", "img_size": 16},
            "split": {r: 60 for r in roles} | {"shard_size": 30},
            "model": sizes.workflow_model,
            "pretrain": {"epochs": sizes.workflow_epochs, "batch_size": 20, "blr": 1e-2}
            | {"warmup_epochs": 1},
            "shadow": {"count": 1},
            "decoder": ["released", "shadow"],
            "extract": {"mask_ratios": [0.75], "num_masks": 4, "grid_samples": 2},
            "attacks": {"threshold": {}},
            "metrics": {"n_bootstrap": 200},
            "runtime": {"num_workers": 0},
        },
        "experiments": {"tiny": {}},
    }


def _snakemake(workdir: Path, config: dict, *args: str) -> tuple[int, float, str]:
    (workdir / "config.yaml").write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile")]
    cmd += ["--directory", str(workdir), "--configfile", str(workdir / "config.yaml"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    # Snakemake 9 prints a failed job's error on stdout, its progress on stderr.
    return run.returncode, time.perf_counter() - t0, (run.stdout + run.stderr)[-3000:]


def section_workflow(args, sizes: Sizes, device, out: dict) -> list[str]:
    import polars as pl

    cores = str(os.cpu_count() or 1)
    base = _workflow_config(sizes, device)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="mimia-gpu-wf-") as tmp:
        cpu_cfg = json.loads(json.dumps(base))
        cpu_cfg["defaults"]["runtime"]["device"] = "cpu"
        dev_cfg = json.loads(json.dumps(base)) | {"gpu": 1, "gpu_share": 4}
        dev_cfg["defaults"]["runtime"]["device"] = device.type
        for name, cfg, extra in (
            ("cpu", cpu_cfg, ()),
            (device.type + "-share4", dev_cfg, ("--resources", "gpu=1")),
        ):
            workdir = Path(tmp) / name
            workdir.mkdir()
            code, seconds, err = _snakemake(workdir, cfg, "--cores", cores, *extra)
            if code:
                return [f"workflow ({name}): exit {code}: {err}"]
            summary = pl.read_csv(workdir / "results" / "summary.csv")
            runs[name] = {"seconds": seconds, "summary": summary.to_dicts()}
    a, b = (runs[k]["summary"] for k in runs)
    rows, fails = [], []
    for ra, rb in zip(a, b, strict=True):
        half = (ra["auc_ci_high"] - ra["auc_ci_low"]) / 2
        gap = abs(ra["auc"] - rb["auc"])
        rows.append(
            {"decoder": ra["decoder"], "attack": ra["attack"], "auc": [ra["auc"], rb["auc"]]}
            | {"gap": gap, "ci_half_width": half, "ok": gap <= half}
        )
        if gap > half:
            fails.append(f"workflow {ra['decoder']}/{ra['attack']}: AUC gap {gap:.3f} > {half:.3f}")
    out.update(runs={k: v["seconds"] for k, v in runs.items()}, rows=rows)
    return fails


def section_share(args, sizes: Sizes, device, out: dict) -> list[str]:
    """Models trained per hour when N training jobs share one device (separate processes, as
    Snakemake runs them, each paying its own start-up)."""
    results = {}
    for n in sizes.share_jobs:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--share-child", "--device"]
        cmd += [device.type, "--out", "-"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(n)
        ]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        wall = time.perf_counter() - t0
        if any(p.returncode for p in procs):
            return [f"share: a job of {n} failed"]
        train_s = [json.loads(o.strip().splitlines()[-1])["train_s"] for o in outs]
        results[str(n)] = {
            "wall_s": wall,
            "train_s": train_s,
            "models_per_hour": n * 3600 / wall,
        }
    one = results[str(sizes.share_jobs[0])]["models_per_hour"]
    for r in results.values():
        r["vs_one_job"] = r["models_per_hour"] / one
    spec_dict = sizes.member_spec
    out.update(
        job=f"{spec_dict.get('encoder')} {spec_dict['img_size']} px, {sizes.share_steps} steps "
        f"of batch {sizes.share_batch}, in a fresh process",
        results=results,
    )
    return []


def share_child(args, sizes: Sizes) -> None:
    device = torch.device(args.device)
    t0 = time.perf_counter()
    spec = ModelSpec(**sizes.member_spec)
    torch.manual_seed(0)
    model = build_model(spec)
    data = images(sizes.share_batch, spec.img_size, seed=1)
    train_mim(model, data, train_cfg(sizes.share_steps, sizes.share_batch, str(device)))
    print(json.dumps({"train_s": time.perf_counter() - t0}))


# -- driver -------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", default="gpu-bench.json", help="JSON record ('-': none)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--cpu-compile", action="store_true", help="smoke mode: torch.compile too")
    p.add_argument("--share-child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def environment(device: torch.device) -> dict:
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "device": device.type,
    }
    if device.type == "cuda":
        env |= {
            "gpu": torch.cuda.get_device_name(0),
            "gpus": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        }
    return env


def table(record: dict) -> str:
    """The printed summary: one line per check."""
    lines = [f"{'check':<34}{'result':<58}verdict"]

    def row(name, text, ok):
        lines.append(f"{name:<34}{text:<58}{'ok' if ok else 'FAIL'}")

    s = record["sections"]
    for name, r in s.get("train", {}).items():
        if "fp32" not in r:
            continue
        row(
            f"train {name} b{r['batch']}",
            f"loss gap {r['loss_gap_rel']:.1e}; img/s {r['fp32']['images_per_s']:.0f} fp32, "
            f"{r['bf16']['images_per_s']:.0f} bf16; TFLOP/s {r['bf16']['tflops']:.1f}",
            r["ok"],
        )
    if "speedup" in s.get("compile", {}):
        c = s["compile"]
        row("compile on/off", f"loss gap {c['loss_gap_rel']:.1e}; {c['speedup']:.2f}x", c["ok"])
    e = s.get("extract", {})
    if "members" in e:
        m = e["members"]
        row(
            "extract bf16 vs fp32 (members)",
            f"rel {m['max_rel_error']:.1e}; rho {m['spearman']:.5f}; AUC {m['auc']['fp32']:.3f}"
            f"/{m['auc']['bf16']:.3f} CI [{m['auc_ci95_fp32'][0]:.3f}, "
            f"{m['auc_ci95_fp32'][1]:.3f}]",
            all(m["checks"].values()),
        )
    if "throughput" in e:
        t = e["throughput"]
        row(
            f"extract {t['model']}",
            f"pairs/s {t['fp32']['pairs_per_s']:.0f} fp32, {t['bf16']['pairs_per_s']:.0f} bf16; "
            f"rel {t['max_rel_error']:.1e}",
            t["ok"],
        )
    b = s.get("extract_bench", {})
    if b.get("mimia_over_naive") is not None:
        row(
            "bench/extract.py",
            f"mimia/naive {b['mimia_over_naive']:.2f}x; mimia/ceiling "
            f"{b['mimia_over_ceiling']:.2f}",
            True,
        )
    d = s.get("ddp", {})
    if "processes" in d:
        row(
            f"ddp {d['processes']} x {d['backend']}",
            f"loss gap {d['loss_gap_rel']:.1e}",
            d["ok"],
        )
    for r in s.get("workflow", {}).get("rows", []):
        row(
            f"workflow {r['decoder']}/{r['attack']}",
            f"AUC {r['auc'][0]:.3f} cpu / {r['auc'][1]:.3f}; CI half {r['ci_half_width']:.3f}",
            r["ok"],
        )
    for n, r in s.get("share", {}).get("results", {}).items():
        row(
            f"share {n} job(s)",
            f"{r['models_per_hour']:.0f} models/h ({r['vs_one_job']:.2f}x one job)",
            True,
        )
    for name, err in record["errors"].items():
        row(name, err.splitlines()[-1][:56], False)
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = GPU_SIZES if args.device == "cuda" else CPU_SIZES
    if args.share_child:
        share_child(args, sizes)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda but torch sees no GPU; --device cpu runs the smoke mode")
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        float32_reference()
    record = {
        "environment": environment(device),
        "tolerances": {
            "loss_rtol": LOSS_RTOL,
            "error_rtol": ERROR_RTOL,
            "min_spearman": MIN_SPEARMAN,
            "auc_ci_share": AUC_CI_SHARE,
        },
        "sections": {},
        "seconds": {},
        "errors": {},
        "failures": [],
    }
    t_start = time.perf_counter()
    for name in args.sections:
        t0 = time.perf_counter()
        out: dict = {}
        print(f"[{time.perf_counter() - t_start:6.0f} s] {name} ...", flush=True)
        try:
            record["failures"] += globals()[f"section_{name}"](args, sizes, device, out)
        except Exception:  # one broken path must not cost the other measurements
            record["errors"][name] = traceback.format_exc()
            print(record["errors"][name], file=sys.stderr)
        record["sections"][name] = out
        record["seconds"][name] = time.perf_counter() - t0
        if args.out != "-":  # after every section: a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps(record, indent=1, default=float))
    record["seconds"]["total"] = time.perf_counter() - t_start
    if args.out != "-":
        Path(args.out).write_text(json.dumps(record, indent=1, default=float))
    print(table(record))
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in record["seconds"].items()))
    for failure in record["failures"]:
        print("FAIL: " + failure)
    return 0 if not record["failures"] and not record["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
