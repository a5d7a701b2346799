"""Per-image costs of the presets' models, and the compute each preset experiment needs.

    PYTHONPATH=src OMP_NUM_THREADS=1 python docs/results/measure_costs.py \
        config/presets/cifar10.yaml [more presets] [--speedup 1000] [--device cpu]

For every distinct architecture: CPU (process) seconds per image of one MIM training step
(forward, backward, AdamW) and of one masked forward in extraction (per mask), on random
images, after one untimed warm-up step. Process time, not wall time: on a shared machine it
counts this process's work, not the time it waited for a core. Then, per experiment, the
whole workflow's work (every pre-training, the adapted decoder, extraction under every
decoder, mask and ratio, EncoderMI views) in CPU-hours on one thread, and in GPU-hours at
``--speedup`` times one CPU thread (an assumption: pass a measured ratio instead, e.g. from
``--device cuda`` runs of this script, which time wall seconds after a synchronize).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import yaml

from mimia.attacks import requires_embeddings
from mimia.config import attack_kind, model_spec, resolve_experiments
from mimia.masking import random_masks
from mimia.models import build_model
from mimia.models.scoring import score_batch


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def measure(spec, train_mask_ratio: float, extract_ratio: float, device, steps: int) -> dict:
    """Seconds per image of a training step and per (image, mask) of extraction."""
    torch.manual_seed(0)
    model = build_model(spec).to(device)
    batch = max(2, 16 * 32 * 32 // spec.img_size**2) if device.type == "cpu" else 128
    x = torch.randint(0, 256, (batch, 3, spec.img_size, spec.img_size), dtype=torch.uint8)
    x = x.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    spent = 0.0
    for step in range(steps + 1):
        t0 = _clock(device)
        mask = random_masks(batch, spec.num_patches, train_mask_ratio, block_size=spec.mask_block)
        with autocast:
            loss = model(x.float() / 255, mask.to(device))[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:
            spent += _clock(device) - t0
    train = spent / (steps * batch)
    model.eval()
    masks, ids, spent = 4, [f"s{i}" for i in range(batch)], 0.0
    with torch.inference_mode():
        for step in range(steps + 1):
            t0 = _clock(device)
            score_batch(model, x, ids, 0, extract_ratio, masks)
            if step:
                spent += _clock(device) - t0
    return {
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "batch": batch,
        "train_s_per_image": train,
        "extract_s_per_image_mask": spent / (steps * batch * masks),
    }


def workload(exp: dict) -> dict:
    """Image-steps of training and (image, mask) forwards of extraction of one experiment."""
    s, count = exp["split"], exp["shadow"]["count"]
    adversary = s["shadow_member"] + s["shadow_nonmember"]
    epochs = exp["pretrain"]["epochs"]
    # target on target_member, shadow0 on shadow_member, shadow i>0 on half the adversary's.
    train = epochs * (s["target_member"] + s["shadow_member"] + (count - 1) * adversary // 2)
    if "adapted" in exp["decoder"]:
        # The frozen encoder still runs forward: counted as full training steps (upper bound).
        train += exp["adapt"]["epochs"] * adversary
    per_image = exp["extract"]["num_masks"] * len(exp["extract"]["mask_ratios"])
    targets = s["target_member"] + s["target_nonmember"]
    forwards = per_image * (len(exp["decoder"]) * targets + count * (targets + adversary))
    kinds = {attack_kind(entry, name) for name, entry in exp["attacks"].items()}
    if any(requires_embeddings(k) for k in kinds):
        forwards += 2 * exp["embed"]["num_views"] * (targets + adversary)
    return {"train_images": train, "extract_forwards": forwards}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("presets", nargs="+", type=Path)
    p.add_argument("--speedup", type=float, default=1000.0, help="GPU / one CPU thread")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    device = torch.device(a.device)
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
                "load": [round(v, 2) for v in os.getloadavg()],
                "device": str(device),
            }
        )
    )
    costs: dict[str, dict] = {}
    for preset in a.presets:
        config = yaml.safe_load(preset.read_text())
        for name, exp in resolve_experiments(config).items():
            spec = model_spec(exp)
            key = json.dumps(
                [spec.to_dict(), exp["pretrain"]["mask_ratio"], exp["extract"]["mask_ratios"][0]]
            )
            if key not in costs:
                costs[key] = measure(
                    spec,
                    exp["pretrain"]["mask_ratio"],
                    exp["extract"]["mask_ratios"][0],
                    device,
                    a.steps,
                )
            c, w = costs[key], workload(exp)
            seconds = (
                w["train_images"] * c["train_s_per_image"]
                + w["extract_forwards"] * c["extract_s_per_image_mask"]
            )
            print(
                json.dumps(
                    {
                        "preset": preset.name,
                        "experiment": name,
                        **c,
                        **w,
                        "cpu_thread_hours": round(seconds / 3600, 2),
                        "gpu_hours": round(seconds / 3600 / a.speedup, 2),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
