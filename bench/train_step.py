"""Training throughput of mimia's MAE against HuggingFace's ViTMAEForPreTraining.

Both models get the same architecture and the same weights (the HF model is saved with
``save_pretrained`` and imported by :func:`mimia.models.checkpoint.import_hf_vitmae`), the
same batch and the same masking noise, and run a full training step each: forward, masked MSE,
backward, AdamW. Contenders are timed side by side in one process with the same thread count,
interleaved over several repeats (warm-up steps, then timed steps); the median images/s is
reported, with the ratio mimia / HF (goal: >= 1.0).

    .venv/bin/python bench/train_step.py                 # ViT-Tiny-ish, 32x32, batch 64
    .venv/bin/python bench/train_step.py --hf-attn sdpa  # skip the eager HF contender
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from mimia.masking import mask_from_noise
from mimia.models.checkpoint import import_hf_vitmae


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--decoder-dim", type=int, default=128)
    p.add_argument("--decoder-depth", type=int, default=2)
    p.add_argument("--decoder-heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--norm-pix-loss", action="store_true")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per contender, once")
    p.add_argument("--rewarm", type=int, default=1, help="untimed steps before each timing")
    p.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument(
        "--hf-attn",
        default="sdpa,eager",
        help="comma-separated HF attn_implementation(s) to time (sdpa, eager)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(
        image_size=args.img_size,
        patch_size=args.patch_size,
        num_channels=3,
        hidden_size=args.dim,
        num_hidden_layers=args.depth,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.dim,
        decoder_hidden_size=args.decoder_dim,
        decoder_num_hidden_layers=args.decoder_depth,
        decoder_num_attention_heads=args.decoder_heads,
        decoder_intermediate_size=4 * args.decoder_dim,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        qkv_bias=True,
        mask_ratio=args.mask_ratio,
        norm_pix_loss=args.norm_pix_loss,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(args.seed)
    hf = ViTMAEForPreTraining(config)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        # mean 0 / std 1: mimia's internal normalisation is the identity on HF's pixel_values.
        mimia, _ = import_hf_vitmae(folder, mean=(0.0,) * 3, std=(1.0,) * 3)
    hfs = {}
    for attn in [a.strip() for a in args.hf_attn.split(",") if a.strip()]:
        model = ViTMAEForPreTraining(config)
        model.load_state_dict(hf.state_dict())
        model.set_attn_implementation(attn)
        hfs[f"HF ViTMAE ({attn})"] = model
    return mimia, hfs


def make_step(model: torch.nn.Module, kind: str, lr: float = 1.5e-4) -> Callable:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.05)

    def step(pixels: torch.Tensor, noise: torch.Tensor, ratio: float) -> float:
        if kind == "mimia":
            loss = model(pixels, mask_from_noise(noise, ratio))[0].mean()
        else:
            loss = model(pixel_values=pixels, noise=noise).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    mimia, hfs = build(args)
    g = torch.Generator().manual_seed(args.seed)
    pixels = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g)
    num_patches = (args.img_size // args.patch_size) ** 2
    noises = [torch.rand(args.batch, num_patches, generator=g) for _ in range(4)]

    # Same weights, same batch, same noise: the first losses must agree before timing.
    with torch.no_grad():
        ref = mimia(pixels, mask_from_noise(noises[0], args.mask_ratio))[0].mean().item()
        for name, model in hfs.items():
            other = model(pixel_values=pixels, noise=noises[0]).loss.item()
            if abs(ref - other) > 1e-4 * max(1.0, abs(ref)):
                raise SystemExit(f"loss mismatch before timing: mimia {ref} vs {name} {other}")

    steps = {"mimia MAE": make_step(mimia, "mimia")}
    steps.update({name: make_step(model, "hf") for name, model in hfs.items()})
    rates: dict[str, list[float]] = {name: [] for name in steps}
    # Images per CPU-second of this process: less sensitive to other jobs on a shared machine.
    cpu_rates: dict[str, list[float]] = {name: [] for name in steps}
    t_start = time.perf_counter()
    for step in steps.values():  # first steps allocate and pick kernels: never timed
        for i in range(args.warmup):
            step(pixels, noises[i % len(noises)], args.mask_ratio)
    for r in range(args.repeats):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))  # cancel order effects
        for name in order:
            step = steps[name]
            for i in range(args.rewarm):
                step(pixels, noises[i % len(noises)], args.mask_ratio)
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(args.steps):
                step(pixels, noises[i % len(noises)], args.mask_ratio)
            rates[name].append(args.batch * args.steps / (time.perf_counter() - t0))
            cpu_rates[name].append(args.batch * args.steps / (time.process_time() - c0))

    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"threads={torch.get_num_threads()}, float32 CPU"
    )
    print(
        f"config: {args.img_size}x{args.img_size} patch {args.patch_size}, encoder "
        f"{args.dim}-d x {args.depth} ({args.heads} heads), decoder {args.decoder_dim}-d x "
        f"{args.decoder_depth} ({args.decoder_heads} heads), batch {args.batch}, mask "
        f"{args.mask_ratio}, norm_pix_loss={args.norm_pix_loss}, AdamW step included"
    )
    print(
        f"timing: {args.warmup} warm-up steps each, then {args.repeats} interleaved repeats x "
        f"({args.rewarm} untimed + {args.steps} timed steps); initial loss {ref:.6f} "
        f"(all contenders agree); "
        f"wall {time.perf_counter() - t_start:.1f}s"
    )
    for label, table in (("images/s", rates), ("images/cpu-s", cpu_rates)):
        mimia_rate = statistics.median(table["mimia MAE"])
        for name, rs in table.items():
            med = statistics.median(rs)
            spread = ", ".join(f"{x:.1f}" for x in rs)
            ratio = "" if name == "mimia MAE" else f"   mimia/HF = {mimia_rate / med:.3f}"
            print(f"{name:<20} median {med:8.1f} {label:<12} [{spread}]{ratio}")


if __name__ == "__main__":
    main()
