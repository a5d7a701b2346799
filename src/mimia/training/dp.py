"""DP-SGD with Opacus: Poisson sampling, per-sample clipping, Gaussian noise, an accountant.

Opacus' hooks compute the per-sample gradients of every layer it has a grad sampler for (the
ViT's patch embedding, linears and layer norms); the ViT's cls token and the decoders' mask
tokens are parameters of modules whose ``forward`` the MIM recipes never call, which Opacus'
hooks (and its functorch fallback, which re-runs a module's ``forward``) cannot see. They are
broadcast tokens (leading dimension 1), so each batch runs with a per-sample copy of each
token, and the gradient of the summed loss with respect to copy ``i`` is exactly sample ``i``'s
gradient. ``tests/test_defenses.py`` checks every parameter's per-sample gradient against one
backward pass per sample.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from mimia.devices import resolve_device
from mimia.models.base import MIMModel
from mimia.training.recipe import TrainConfig, param_groups


def _register_timm_layers() -> None:
    """timm's ``LayerNorm`` is ``nn.LayerNorm`` computing ``F.layer_norm`` (fused or not);
    Opacus looks grad samplers up by exact type, so it gets ``nn.LayerNorm``'s."""
    from opacus.grad_sample import GradSampleModule
    from timm.layers.norm import LayerNorm

    samplers = GradSampleModule.GRAD_SAMPLERS
    samplers.setdefault(LayerNorm, samplers[nn.LayerNorm])


def _token_parameters(model: nn.Module) -> dict[str, tuple[nn.Module, Any]]:
    """Trainable parameters owned by modules Opacus has no grad sampler for, by name.

    Each must be a broadcast token (leading dimension 1): its per-sample gradient comes from a
    per-sample copy (see the module docstring). Anything else is refused by name.
    """
    from opacus.grad_sample import GradSampleModule

    _register_timm_layers()
    tokens = {}
    for module_name, module in model.named_modules():
        if type(module) in GradSampleModule.GRAD_SAMPLERS:
            continue
        for param_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            name = f"{module_name}.{param_name}" if module_name else param_name
            if p.ndim < 2 or p.shape[0] != 1:
                raise ValueError(
                    f"DP training cannot compute per-sample gradients of parameter {name} "
                    f"{tuple(p.shape)}: Opacus has no grad sampler for "
                    f"{type(module).__name__} and it is not a broadcast token [1, ...]"
                )
            tokens[name] = (module, p)
    return tokens


def _grad_sample_module(model: nn.Module, owners: set[int]):
    """Opacus' hooks on every layer it has a grad sampler for, below the token owners too."""
    from opacus.grad_sample import GradSampleModule

    class LayerHooks(GradSampleModule):
        def iterate_submodules(self, module):
            if id(module) in owners:  # their own parameters are tokens: see _token_parameters
                for child in module.children():
                    yield from self.iterate_submodules(child)
            else:
                yield from super().iterate_submodules(module)

        def capture_activations_hook(self, module, forward_input, forward_output):
            # Opacus' conv grad sampler unfolds activations with as_strided, which assumes a
            # contiguous tensor: SimMIM's head gets a transposed feature map (wrong without this).
            inputs = [t.contiguous() if isinstance(t, torch.Tensor) else t for t in forward_input]
            super().capture_activations_hook(module, inputs, forward_output)

    # Opacus refuses trainable modules holding buffers (BatchNorm statistics would leak); the
    # MIM models' only buffers are the fixed pixel mean and std, so the check is done here.
    buffers = [n for n, _ in model.named_buffers() if n not in ("pixel_mean", "pixel_std")]
    if buffers:
        raise ValueError(f"DP training does not support models with buffers {buffers}")
    return LayerHooks(model, batch_first=True, loss_reduction="sum", strict=False)


class PerSampleGradients:
    """Per-sample gradients of a MIM model's masked loss, as Opacus' optimizer reads them.

    ``step(images, mask)`` runs one forward and backward pass and leaves every trainable
    parameter's ``grad_sample`` ``[B, *shape]``: the gradient of each sample's own loss.
    """

    def __init__(self, model: MIMModel) -> None:
        self.model = model
        self.tokens = _token_parameters(model)
        self.hooks = _grad_sample_module(model, {id(m) for m, _ in self.tokens.values()})
        self.params = [p for p in model.parameters() if p.requires_grad]

    def step(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-sample losses ``[B]`` of images in [0, 1]; grad samples set as a side effect."""
        b = images.shape[0]
        if b == 0:  # Poisson sampling may draw an empty batch: noise only
            for p in self.params:
                p.grad_sample = torch.zeros(0, *p.shape, dtype=p.dtype, device=p.device)
            return torch.zeros(0, device=images.device)
        copies = {
            name: p.detach().expand(b, *p.shape[1:]).clone().requires_grad_(True)
            for name, (_, p) in self.tokens.items()
        }
        losses = torch.func.functional_call(self.model, copies, (images, mask))[0]
        with warnings.catch_warnings():
            # The patch embedding's input needs no gradient; its weight's hook still fires.
            warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
            losses.sum().backward()
        for name, (_, p) in self.tokens.items():
            p.grad_sample = copies[name].grad.reshape(b, *p.shape)
        return losses.detach()

    def close(self) -> None:
        self.hooks.remove_hooks()
        self.hooks.cleanup()


def noise_multiplier_for(dp: dict, sample_rate: float, steps: int) -> float:
    """``dp.noise_multiplier``, or the one Opacus finds for ``dp.target_epsilon``."""
    if "noise_multiplier" in dp:
        return float(dp["noise_multiplier"])
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=dp["target_epsilon"],
            target_delta=dp["delta"],
            sample_rate=sample_rate,
            steps=steps,
            accountant=dp["accountant"],
        )
    )


class DPSGD:
    """DP-SGD in one process: the recipe's AdamW, lr schedule, augmentation and masks, with
    Opacus' Poisson sampling (each image joins each step with probability batch_size / N,
    N / batch_size steps per epoch), per-sample clipping to ``dp.max_grad_norm`` and Gaussian
    noise of ``noise_multiplier * max_grad_norm`` on the summed gradient, averaged over the
    expected batch size. Float32, no compile (Opacus' hooks). The epoch loss is the mean over
    the images sampled.

    Generators, seeded from the run's seed: ``sampling`` (seed), ``masking`` (seed + 1) and
    ``noising`` (seed + 2, on the device); the accountant resumes with them.
    """

    generator_keys = ("sampling", "masking", "noising")
    extra_keys = ("accountant",)
    is_main = True

    def __init__(self, dp: dict) -> None:
        self.dp = dp

    def prepare(self, model: MIMModel, images: torch.Tensor, cfg: TrainConfig) -> None:
        from opacus.accountants import create_accountant
        from opacus.data_loader import DPDataLoader
        from opacus.optimizers import DPOptimizer
        from torch.utils.data import TensorDataset

        dp = self.dp
        if cfg.accum_iter != 1:
            raise ValueError(f"DP training needs accum_iter 1, got {cfg.accum_iter}")
        if cfg.devices != 1:
            raise ValueError(f"DP training runs in one process, got devices={cfg.devices}")
        self.cfg = cfg
        self.device = device = resolve_device(cfg.device)
        model.to(device).train()
        torch.manual_seed(cfg.seed)
        self.sample_rate = cfg.batch_size / images.shape[0]
        self.sampling = torch.Generator().manual_seed(cfg.seed)
        self.masking = torch.Generator().manual_seed(cfg.seed + 1)
        self.noising = torch.Generator(device=device).manual_seed(cfg.seed + 2)
        self.loader = DPDataLoader(
            TensorDataset(images), sample_rate=self.sample_rate, generator=self.sampling
        )
        self.steps = len(self.loader)
        self.sigma = noise_multiplier_for(dp, self.sample_rate, self.steps * cfg.epochs)
        self.grads = PerSampleGradients(model)
        self.optimizer = DPOptimizer(
            torch.optim.AdamW(
                param_groups(model.named_parameters(), cfg.weight_decay),
                lr=cfg.lr,
                betas=cfg.betas,
            ),
            noise_multiplier=self.sigma,
            max_grad_norm=float(dp["max_grad_norm"]),
            expected_batch_size=cfg.batch_size,
            loss_reduction="mean",
            generator=self.noising,
        )
        self.accountant = create_accountant(mechanism=dp["accountant"])
        self.optimizer.attach_step_hook(
            self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate)
        )

    @property
    def mask_generator(self) -> torch.Generator:
        return self.masking

    def resume_state(self) -> dict:
        return {
            "sampling": self.sampling.get_state(),
            "masking": self.masking.get_state(),
            "noising": self.noising.get_state(),
            "accountant": self.accountant.state_dict(),
        }

    def load_state(self, state: dict) -> None:
        for key in self.generator_keys:
            getattr(self, key).set_state(state[key])
        self.accountant.load_state_dict(state["accountant"])

    def wrap(self, model: nn.Module) -> nn.Module:
        return model  # the per-sample gradients call the model themselves

    def batches(self):
        for (batch,) in self.loader:
            yield batch

    def step(self, forward: nn.Module, step: int, batch: torch.Tensor, mask: torch.Tensor):
        batch = batch.to(self.device).float().div_(255)
        losses = self.grads.step(batch, mask.to(self.device))
        if bool(torch.isfinite(losses).all()):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(losses.sum()), len(losses)

    def epsilon(self) -> float | None:
        """The accountant's epsilon so far; None without noise (no guarantee: epsilon = inf)."""
        if self.sigma == 0:
            return None
        if not self.accountant.history:
            return 0.0
        return float(self.accountant.get_epsilon(delta=self.dp["delta"]))

    def epoch_record(self) -> dict:
        epsilon = self.epsilon()
        return {"epsilon": math.inf if epsilon is None else epsilon}

    def privacy(self) -> dict:
        """The privacy record of the run so far."""
        dp = self.dp
        return {
            "epsilon": self.epsilon(),
            "delta": float(dp["delta"]),
            "noise_multiplier": self.sigma,
            "max_grad_norm": float(dp["max_grad_norm"]),
            "target_epsilon": dp.get("target_epsilon"),
            "accountant": dp["accountant"],
            "sample_rate": self.sample_rate,
            "expected_batch_size": self.cfg.batch_size,
            "steps": sum(h[2] for h in self.accountant.history),
            "sampling": "poisson",
            "secure_mode": False,
        }

    def close(self) -> None:
        self.grads.close()
