"""Benchmark of mimia's extraction path against naive HuggingFace code and the pure forward.

Run ``python bench/extract.py [--images N --masks K --batch B --threads T --device cpu|cuda]``.
One run measures, on the same ViT-Base MAE at 224x224 (random weights, by default the same
weights in both implementations), with the same batch size, thread count, images and masks:

1. ``mimia``   - :func:`mimia.extract.extract_shard` over webdataset shards that this script
   writes itself (procedural PNGs, written by :func:`mimia.data.shards.write_tar_shard`):
   PNG decode in the DataLoader worker, the stacked ``B x K`` forward, Parquet writing.
2. ``naive``   - ``transformers.ViTMAEForPreTraining`` as a user would drive it: PNGs decoded
   with PIL in the main process (no workers), one forward per mask over the batch (the same
   masks, passed as ``noise``), per-sample loss recomputed from logits and mask, results
   written once at the end.
3. ``ceiling`` - :func:`mimia.models.scoring.score_batch` on images already decoded and on the
   device: the model alone, no data loading, no output.

Paths run interleaved shard by shard (their order rotating), so load from other processes
hits all three alike. Throughput is (images x masks) per second. Peak RSS of the mimia path
for N and 4N images is measured in fresh subprocesses (``--rss-child``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

SPEC = dict(
    recipe="mae",
    encoder="vit_base_patch16_224",
    img_size=224,
    patch_size=16,
    decoder_embed_dim=512,
    decoder_depth=8,
    decoder_num_heads=16,
)
HF_CONFIG = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    decoder_hidden_size=512,
    decoder_num_hidden_layers=8,
    decoder_num_attention_heads=16,
    decoder_intermediate_size=2048,
    image_size=224,
    patch_size=16,
    num_channels=3,
    hidden_act="gelu",
    qkv_bias=True,
    layer_norm_eps=1e-6,  # as timm / official MAE (transformers' default is 1e-12)
    norm_pix_loss=False,
)
GOAL_VS_NAIVE = 1.2
GOAL_VS_CEILING = 0.85
GOAL_RSS = 0.10
ROLES = ("target_member", "target_nonmember", "shadow_member", "shadow_nonmember")


# -- inputs -------------------------------------------------------------------------------------
class SmoothSource:
    """ImageSource-like: smooth random colour fields plus mild noise, a pure function of index.

    Smooth fields at two scales give PNGs of realistic size (~90 KB at 224x224) and so a
    realistic decode cost; pure noise would be larger, flat colour far smaller.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def image(self, index: int, size: int) -> np.ndarray:
        from PIL import Image

        rng = np.random.default_rng([self.seed, int(index)])
        img = np.zeros((size, size, 3), np.float32)
        for cells, weight in ((4, 0.6), (16, 0.4)):
            coarse = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
            up = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
            img += weight * np.asarray(up, np.float32)
        img += rng.normal(0.0, 3.0, img.shape).astype(np.float32)
        return np.clip(img, 0, 255).astype(np.uint8)


def write_shards(folder: Path, name: str, n: int, shard_size: int, img_size: int, seed: int):
    """``ceil(n / shard_size)`` shards of ``n`` images, mimia's format, one role per shard."""
    import polars as pl
    from PIL import Image

    from mimia.data.shards import write_tar_shard
    from mimia.data.sources import ImageSource, pixel_sha256

    smooth = SmoothSource(seed)
    source = ImageSource(
        "smooth",
        [str(i) for i in range(n)],
        None,
        lambda i: Image.fromarray(smooth.image(i, img_size)),
        lambda i: "generated",
    )
    paths = []
    for s, start in enumerate(range(0, n, shard_size)):
        idx = list(range(start, min(n, start + shard_size)))
        rows = pl.DataFrame(
            {
                "sample_id": [f"{name}-{i:06d}" for i in idx],
                "source_index": idx,
                "key": [str(i) for i in idx],
                "content_sha256": [pixel_sha256(smooth.image(i, img_size)) for i in idx],
                "label": [i % 10 for i in idx],
                "role": [ROLES[s % len(ROLES)]] * len(idx),
            }
        )
        path = folder / f"{name}-{s:04d}.tar"
        write_tar_shard(rows, source, img_size, path)
        paths.append(path)
    return paths


# -- models -------------------------------------------------------------------------------------
def build_models(device: torch.device, attn: str, same_weights: bool, seed: int, tmp: Path):
    """mimia's MAE from ``SPEC`` and HF's ViTMAEForPreTraining of the same dimensions.

    With ``same_weights`` the HF model's random weights are carried into the mimia model
    (``save_pretrained`` + :func:`import_hf_vitmae`), so both compute the same function and
    the benchmark can check that the naive losses equal mimia's errors.
    """
    import transformers

    from mimia.models.mae import MAE
    from mimia.models.spec import ModelSpec

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    cfg = transformers.ViTMAEConfig(**HF_CONFIG, mask_ratio=0.75)
    if attn != "default":
        cfg._attn_implementation = attn
    hf = transformers.ViTMAEForPreTraining(cfg).eval()
    model = MAE(ModelSpec(**SPEC)).eval()
    shared = False
    if same_weights:
        try:
            from mimia.models.checkpoint import import_hf_vitmae

            hf.save_pretrained(tmp / "hf")
            imported, _ = import_hf_vitmae(tmp / "hf")
            model.load_state_dict(imported.state_dict(), strict=True)
            shared = True
            del imported
        except Exception as exc:  # the benchmark stays useful without the cross-check
            warnings.warn(f"could not share weights ({exc!r}); models keep their own", stacklevel=2)
        finally:
            import shutil

            shutil.rmtree(tmp / "hf", ignore_errors=True)
    return model.to(device), hf.to(device), shared, hf.config._attn_implementation


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the three paths ----------------------------------------------------------------------------
class Timed:
    """Wraps a function and sums the wall time spent in it."""

    def __init__(self, fn: Callable, device: torch.device, sync: bool = True) -> None:
        self.fn, self.device, self.sync, self.seconds, self.calls = fn, device, sync, 0.0, 0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        if self.sync:
            _sync(self.device)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def run_mimia(model, shard: Path, out: Path, args, timers: dict[str, Timed]) -> tuple[float, int]:
    """extract_shard as the workflow runs it.

    ``score_batch`` and the mask computation inside it are timed by swapping timing wrappers
    into ``mimia.extract``'s and ``mimia.models.scoring``'s namespaces for the call; what they
    run is unchanged.
    """
    import mimia.extract as ex
    import mimia.models.scoring as scoring

    original = ex.score_batch, scoring.deterministic_masks
    ex.score_batch, scoring.deterministic_masks = timers["score_batch"], timers["masks"]
    try:
        t0 = time.perf_counter()
        rows = ex.extract_shard(
            model,
            shard,
            out,
            model_name="bench",
            decoder="own",
            seed=args.seed,
            mask_ratios=[args.mask_ratio],
            num_masks=args.masks,
            batch_size=args.batch,
            num_workers=args.workers,
        )
        _sync(args.device)
        return time.perf_counter() - t0, rows
    finally:
        ex.score_batch, scoring.deterministic_masks = original


def preload(shard: Path, batch: int, device: torch.device):
    """The shard decoded into batches of uint8 images already on the device (not timed)."""
    from mimia.data.shards import shard_dataset

    items = list(shard_dataset([shard]))
    batches = []
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        imgs = torch.stack([img for _, img, _ in chunk]).to(device)
        batches.append(([sid for sid, _, _ in chunk], imgs))
    return batches


def run_loader(shards: list[Path], args) -> float:
    """mimia's loader alone, one per shard as extract_shard makes it: the decode ceiling."""
    from mimia.extract import shard_loader

    t0 = time.perf_counter()
    for shard in shards:
        for _ in shard_loader([shard], args.batch, args.workers):
            pass
    return time.perf_counter() - t0


def run_ceiling(model, batches, args) -> float:
    from mimia.models.scoring import score_batch

    t0 = time.perf_counter()
    for ids, imgs in batches:
        score_batch(model, imgs, ids, args.seed, args.mask_ratio, args.masks)
    _sync(args.device)
    return time.perf_counter() - t0


@torch.inference_mode()
def naive_forward(hf, pixel_values: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One HF forward; the per-sample loss from logits and mask (HF's own loss is a mean)."""
    out = hf(pixel_values=pixel_values, noise=noise)
    target = hf.patchify(pixel_values)
    per_patch = ((out.logits - target) ** 2).mean(dim=-1)
    return (per_patch * out.mask).sum(1) / out.mask.sum(1)


def run_naive(hf, shard: Path, out: Path, args) -> tuple[float, float, list]:
    """PIL decode in the main process, K forwards per batch, one Parquet at the end.

    Returns (seconds, seconds spent decoding, rows). The noise is mimia's keyed noise, so the
    masks are identical to mimia's (HF keeps the lowest-noise patches, as mimia does).
    """
    import io

    import polars as pl
    import webdataset as wds
    from PIL import Image

    from mimia.masking import mask_noise

    device = args.device
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    grid = (HF_CONFIG["image_size"] // HF_CONFIG["patch_size"]) ** 2
    rows: list = []
    decode_s = 0.0

    def flush(ids, arrays):
        x = torch.from_numpy(np.stack(arrays)).to(device).permute(0, 3, 1, 2).float() / 255
        x = (x - mean) / std
        noise = mask_noise(args.seed, ids, args.mask_ratio, range(args.masks), grid)
        for k in range(args.masks):
            loss = naive_forward(hf, x, noise[:, k].to(device)).cpu().tolist()
            rows.extend((sid, k, v) for sid, v in zip(ids, loss, strict=True))

    t0 = time.perf_counter()
    ids, arrays = [], []
    for sample in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False):
        t1 = time.perf_counter()
        img = Image.open(io.BytesIO(sample["png"])).convert("RGB")
        arrays.append(np.asarray(img, dtype=np.uint8))
        ids.append(sample["__key__"])
        decode_s += time.perf_counter() - t1
        if len(ids) == args.batch:
            flush(ids, arrays)
            ids, arrays = [], []
    if ids:
        flush(ids, arrays)
    sid, k, err = zip(*rows, strict=True)
    pl.DataFrame({"sample_id": sid, "mask_index": k, "error": err}).write_parquet(out)
    _sync(device)
    return time.perf_counter() - t0, decode_s, rows


# -- peak RSS in a fresh process ----------------------------------------------------------------
def _status_mib(field: str) -> float | None:
    """``VmHWM`` (peak RSS of this address space) or ``VmRSS`` from /proc/self/status, MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5), so the peak is the stage's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _watch_workers(stop, peaks: dict) -> None:
    """Sample the private memory (USS) of every child process: the DataLoader workers.

    A forked worker's RSS counts the pages it shares with the parent; USS is what it adds.
    """
    import psutil

    me = psutil.Process()
    while not stop.wait(0.05):
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                uss = child.memory_full_info().uss / 2**20
                peaks[child.pid] = max(peaks.get(child.pid, 0.0), uss)


def rss_child(args) -> None:
    """Build the model, warm up, run extract_shard over ``--rss-child`` shards; print JSON.

    Peak RSS is read from ``VmHWM``, reset after the warm-up, so it is the extraction's own
    peak (``ru_maxrss`` would not do: Linux carries the parent's peak over fork + exec).
    """
    import threading

    from mimia.extract import extract_shard
    from mimia.models.mae import MAE
    from mimia.models.scoring import score_batch
    from mimia.models.spec import ModelSpec

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = args.device
    model = MAE(ModelSpec(**SPEC)).to(device).eval()
    imgs = torch.randint(0, 256, (args.batch, 3, 224, 224), dtype=torch.uint8)
    score_batch(model, imgs, [f"w{i}" for i in range(args.batch)], 0, args.mask_ratio, args.masks)
    setup_peak = _status_mib("VmHWM")
    reset = _reset_peak()
    before = _status_mib("VmRSS")
    peaks: dict = {}
    stop = threading.Event()
    watcher = None
    with contextlib.suppress(ImportError):
        import psutil  # noqa: F401

        watcher = threading.Thread(target=_watch_workers, args=(stop, peaks), daemon=True)
        watcher.start()
    t0 = time.perf_counter()
    rows = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, shard in enumerate(args.rss_child):
            rows += extract_shard(
                model,
                shard,
                Path(tmp) / f"errors-{i}.parquet",
                model_name="bench",
                decoder="own",
                seed=args.seed,
                mask_ratios=[args.mask_ratio],
                num_masks=args.masks,
                batch_size=args.batch,
                num_workers=args.workers,
            )
    seconds = time.perf_counter() - t0
    stop.set()
    if watcher is not None:
        watcher.join()
    peak = _status_mib("VmHWM") if reset else None
    if peak is None:  # no /proc: the lifetime peak, which includes the parent's before exec
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "rows": rows,
        "seconds": seconds,
        "setup_peak_mb": setup_peak,
        "before_mb": before,
        "peak_mb": peak,
        "worker_uss_mb": max(peaks.values()) if peaks else None,
    }
    if device.type == "cuda":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(result))


def measure_rss(shards: list[Path], args) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--rss-child",
        *map(str, shards),
        "--masks",
        str(args.rss_masks),
        "--batch",
        str(args.batch),
        "--threads",
        str(args.threads),
        "--workers",
        str(args.workers),
        "--device",
        args.device.type,
        "--seed",
        str(args.seed),
        "--mask-ratio",
        str(args.mask_ratio),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- reporting ----------------------------------------------------------------------------------
def cpu_busy_seconds() -> float | None:
    """Machine-wide busy CPU seconds from /proc/stat (None off Linux)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    v = [int(x) for x in fields]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    self_, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return self_.ru_utime + self_.ru_stime + kids.ru_utime + kids.ru_stime


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=32, help="N images (default 32)")
    p.add_argument("--masks", type=int, default=4, help="K masks per image (default 4)")
    p.add_argument("--batch", type=int, default=8, help="images per batch, all paths (8)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--workers", type=int, default=1, help="mimia DataLoader workers (1)")
    p.add_argument("--shard-size", type=int, default=16, help="images per shard (16)")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--hf-attn",
        choices=("default", "eager", "sdpa"),
        default="default",
        help="HF attention implementation; 'default' is what a user gets (sdpa in 5.x)",
    )
    p.add_argument("--no-same-weights", action="store_true", help="skip the weight sharing")
    p.add_argument("--rss-images", type=int, default=16, help="N for the RSS check (16)")
    p.add_argument("--rss-masks", type=int, default=1, help="K in the RSS children (1)")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--rounds", type=int, default=1, help="passes over the shards (1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rss-child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return args


def print_header(args) -> None:
    import timm
    import transformers

    device, cores = args.device, os.cpu_count() or 1
    n, k, b = args.images, args.masks, args.batch
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print("=" * 78)
    print("mimia extraction benchmark: mimia extract_shard vs naive HF ViTMAE vs pure forward")
    print("=" * 78)
    print("model     : MAE ViT-B/16 @224 (enc 768x12x12h, dec 512x8x16h), random weights")
    print(
        f"work      : N={n} images x K={k} masks (ratio {args.mask_ratio}) = {n * k} pairs"
        f"{f' x {args.rounds} rounds' if args.rounds > 1 else ''}, batch {b} images "
        f"({b * k} image-mask pairs per mimia forward)"
    )
    print(
        f"shards    : {math.ceil(n / args.shard_size)} webdataset shard(s) of <= "
        f"{args.shard_size} PNG images; paths interleaved per shard, order rotating"
    )
    if device.type == "cuda":
        kind = f" ({torch.cuda.get_device_name(device)}), mimia bf16 autocast, naive HF float32"
    else:
        kind = ", everything float32"
    print(f"device    : {device.type}{kind}")
    print(
        f"threads   : torch.set_num_threads({torch.get_num_threads()}) on {cores} logical "
        f"cores; mimia DataLoader workers={args.workers}; naive decodes in the main process"
    )
    print(
        f"software  : python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, timm {timm.__version__}"
    )
    print(f"load avg  : {load:.2f} (1 min) at start")


def measure(args, tmp: Path) -> dict:
    """Everything timed, in one temporary folder: the three paths, the loader, the RSS."""
    import pyarrow.parquet as pq

    from mimia.masking import deterministic_masks
    from mimia.models.scoring import score_batch

    device, n, k, b = args.device, args.images, args.masks, args.batch
    busy0, own0, wall0 = cpu_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    t0 = time.perf_counter()
    shards = write_shards(tmp / "shards", "bench", n, args.shard_size, 224, args.seed)
    png_kb = sum(p.stat().st_size for p in shards) / n / 1024
    model, hf, shared, attn = build_models(
        device, args.hf_attn, not args.no_same_weights, args.seed, tmp
    )
    print(
        f"setup     : shards written and models built in {time.perf_counter() - t0:.1f} s "
        f"(~{png_kb:.0f} KiB per PNG incl. tar overhead); HF attn_implementation={attn!r}; "
        f"weights " + ("shared (HF -> mimia)" if shared else "independent")
    )

    # Warm-up with the timed shapes: oneDNN/cuBLAS kernels, allocator, lazy imports.
    ids, imgs = preload(shards[0], b, device)[0]
    t0 = time.perf_counter()
    score_batch(model, imgs, ids, args.seed, args.mask_ratio, k)
    x = torch.randn(len(ids), 3, 224, 224, device=device)
    naive_forward(hf, x, torch.rand(len(ids), 196, device=device))
    _sync(device)
    print(f"warm-up   : {time.perf_counter() - t0:.1f} s", flush=True)

    res = {
        "seconds": {"mimia": 0.0, "naive": 0.0, "ceiling": 0.0},
        "per_shard": {"mimia": [], "naive": [], "ceiling": []},  # [round][shard]
        "decode_s": 0.0,
        "max_diff": 0.0,
        "shared": shared,
        "attn": attn,
        "timers": {
            "score_batch": Timed(score_batch, device),
            "masks": Timed(deterministic_masks, device, sync=False),
        },
    }
    step = 0
    for _ in range(args.rounds):
        for times in res["per_shard"].values():
            times.append([])
        for s, shard in enumerate(shards):
            batches = preload(shard, b, device)
            order = ["mimia", "naive", "ceiling"]
            order = order[step % 3 :] + order[: step % 3]
            step += 1
            for path in order:
                if path == "mimia":
                    out = tmp / f"mimia-{s}.parquet"
                    dt, rows = run_mimia(model, shard, out, args, res["timers"])
                    assert rows == sum(len(i) for i, _ in batches) * k, rows
                elif path == "naive":
                    dt, dec, naive_rows = run_naive(hf, shard, tmp / f"naive-{s}.parquet", args)
                    res["decode_s"] += dec
                else:
                    dt = run_ceiling(model, batches, args)
                res["seconds"][path] += dt
                res["per_shard"][path][-1].append(dt)
            if shared:  # same weights, same masks: the naive losses are mimia's errors
                mimia_err = {
                    (r["sample_id"], r["mask_index"]): r["error"]
                    for r in pq.read_table(tmp / f"mimia-{s}.parquet").to_pylist()
                }
                for sid, mi, err in naive_rows:
                    ref = mimia_err[(sid, mi)]
                    res["max_diff"] = max(res["max_diff"], abs(err - ref) / max(abs(ref), 1e-12))
    del model, hf
    res["loader_s"] = run_loader(shards, args)
    busy1, own1, wall1 = cpu_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    res["wall"] = wall1 - wall0
    res["others"] = None
    if busy0 is not None and busy1 is not None:
        res["others"] = max(0.0, (busy1 - busy0) - (own1 - own0))

    res["rss"] = None
    if not args.no_rss:
        m = args.rss_images
        small = write_shards(tmp / "rss", "rss1", m, m, 224, args.seed + 1)
        large = write_shards(tmp / "rss", "rss4", 4 * m, 4 * m, 224, args.seed + 2)
        res["rss"] = (measure_rss(small, args), measure_rss(large, args))
    return res


def report(args, res: dict) -> None:
    device, cores = args.device, os.cpu_count() or 1
    n, k, b = args.images, args.masks, args.batch
    rounds, timers = args.rounds, res["timers"]
    # The table: per shard the best of the rounds (with one round, simply the time); the
    # breakdown: means over rounds.
    seconds = {
        p: sum(min(shard_times) for shard_times in zip(*per_round, strict=True))
        for p, per_round in res["per_shard"].items()
    }
    mean = {p: v / rounds for p, v in res["seconds"].items()}
    decode_s = res["decode_s"] / rounds
    thr = {p: n * k / s for p, s in seconds.items()}
    r_naive, r_ceil = thr["mimia"] / thr["naive"], thr["mimia"] / thr["ceiling"]
    inside = timers["score_batch"].seconds / rounds
    outside = mean["mimia"] - inside
    loader_ips, ceiling_ips = n / res["loader_s"], thr["ceiling"] / k
    load = res["others"] / res["wall"] if res["others"] is not None else None
    shaky = load is not None and load > 0.25
    caveat = " (unreliable: machine loaded, see note)" if shaky else ""

    print("-" * 78)
    best = f" (per shard best of {rounds} rounds)" if rounds > 1 else ""
    print(f"{'path':<10}{'seconds':>10}{'pairs/s':>10}   what is timed{best}")
    desc = {
        "mimia": "extract_shard: worker PNG decode, B x K forward, Parquet",
        "naive": f"HF ViTMAE ({res['attn']}), PIL decode in main, K forwards of B",
        "ceiling": "score_batch on preloaded uint8 tensors",
    }
    for p in ("mimia", "naive", "ceiling"):
        print(f"{p:<10}{seconds[p]:>10.2f}{thr[p]:>10.2f}   {desc[p]}")
    print("-" * 78)
    print(
        f"mimia / naive   = {r_naive:.2f}x  (goal >= {GOAL_VS_NAIVE}x): "
        f"{verdict(r_naive >= GOAL_VS_NAIVE)}{caveat}"
    )
    print(
        f"mimia / ceiling = {r_ceil:.2f}   (goal >= {GOAL_VS_CEILING}, overhead "
        f"{1 - r_ceil:+.0%}): {verdict(r_ceil >= GOAL_VS_CEILING)}{caveat}"
    )
    print(
        f"  mimia breakdown: {inside:.2f} s in score_batch "
        f"({timers['score_batch'].calls // rounds} calls; "
        f"{timers['masks'].seconds / rounds:.3f} s of it computing masks), {outside:.2f} s "
        f"outside it (loader wait, worker start per shard, rows, Parquet)"
    )
    print(
        f"  loader alone   : {loader_ips:.0f} images/s with {args.workers} worker(s) and a "
        f"loader per shard; the model alone does {ceiling_ips:.2f} images/s at K={k}"
        + (" -> DECODE-BOUND" if loader_ips < ceiling_ips else " (not decode-bound)")
    )
    print(
        f"  naive breakdown: {decode_s:.2f} s PIL decode in the main process "
        f"({decode_s / mean['naive']:.1%} of its time), the rest HF forwards"
    )
    if res["shared"]:
        kind = "bf16 vs float32" if device.type == "cuda" else "float32"
        print(
            f"  cross-check    : naive per-sample loss vs mimia 'error', same weights and "
            f"masks ({kind}): max rel. diff {res['max_diff']:.1e}"
        )
    if load is not None:
        print(
            f"  interference   : other processes used {res['others']:.0f} CPU-s during the "
            f"{res['wall']:.0f} s of setup and timing ({load:.2f} of {cores} cores)"
        )

    if res["rss"] is not None:
        print("-" * 78)
        print(
            f"peak RSS of the mimia path during extract_shard (fresh process each, after a "
            f"warm-up; K={args.rss_masks}, batch {b}):"
        )
        totals = []
        sizes = (("N", args.rss_images), ("4N", 4 * args.rss_images))
        for (label, m), r in zip(sizes, res["rss"], strict=True):
            worker = r["worker_uss_mb"] or 0.0
            totals.append(r["peak_mb"] + worker)
            line = (
                f"  {label:<3}= {m:>4} images: {totals[-1]:6.0f} MiB = main {r['peak_mb']:.0f} "
                f"(RSS {r['before_mb']:.0f} before) + loader worker {worker:.0f} (private); "
                f"{r['rows']} rows in {r['seconds']:.1f} s"
            )
            if "cuda_peak_mb" in r:
                line += f"; CUDA peak {r['cuda_peak_mb']:.0f} MiB"
            print(line)
        ratio = totals[1] / totals[0]
        print(
            f"  4N / N = {ratio:.3f} (goal within {GOAL_RSS:.0%}): "
            f"{verdict(abs(ratio - 1) <= GOAL_RSS)}; growth {totals[1] - totals[0]:+.0f} MiB"
        )

    print("-" * 78)
    notes = []
    if r_naive < GOAL_VS_NAIVE:
        bound = mean["naive"] / (mean["naive"] - decode_s)
        notes.append(
            f"mimia/naive below {GOAL_VS_NAIVE}x. Both run the same FLOPs (same architecture "
            f"and masks), so mimia can only win on the pipeline: "
            f"decode off the main thread and one stacked B x K forward. PNG decode is "
            f"{decode_s / mean['naive']:.1%} of naive's time here, so even a free pipeline "
            f"would give at most {bound:.2f}x; stacking does not make CPU matrix products "
            f"faster. On {cores} CPU cores the goal is out of reach by construction; only "
            f"where the forward is fast (--device cuda, bf16) can decode be a large share."
        )
    if r_ceil < GOAL_VS_CEILING:
        contended = device.type == "cpu" and args.workers + args.threads > cores
        notes.append(
            f"mimia/ceiling below {GOAL_VS_CEILING}. The same score_batch calls took "
            f"{inside:.1f} s inside extract_shard vs {mean['ceiling']:.1f} s on preloaded "
            f"tensors ({inside / mean['ceiling'] - 1:+.0%}): CPU contention"
            + (
                f" (the loader worker shares {cores} cores with {args.threads} compute threads"
                if contended
                else " (other processes"
            )
            + f"); {outside:.1f} s went outside the model (loader wait, worker start, Parquet)."
        )
    if loader_ips < ceiling_ips:
        notes.append(
            "decode-bound: extract_shard reads one shard and webdataset gives each shard to "
            "one DataLoader worker, so more workers do not help; see bench/README.md"
        )
    if shaky:
        notes.append(
            f"other processes took {load:.2f} of {cores} cores during the run. The paths "
            f"ran interleaved per shard, yet each shard's runs are seconds apart and the "
            f"load moves: figures and ratios are noisy. Rerun on a quiet machine, or with "
            f"--rounds 3 (per shard the best of 3)."
        )
    for note in notes:
        print("note: " + note)
    if not notes:
        print("all goals met, machine quiet")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rss_child:
        rss_child(args)
        return 0
    torch.set_num_threads(args.threads)
    print_header(args)
    with tempfile.TemporaryDirectory(prefix="mimia-bench-") as tmp:
        res = measure(args, Path(tmp))
    report(args, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
