"""Fitting MIM models: the recipe, one training loop with its engines (one process, DDP,
DP-SGD), early stopping, resume files, the DDP launcher and the entry point :func:`run`.

Imports nothing above it (neither the config layer, nor extraction, nor the stages): a
complete training section and the data come in, weights and their history go out.

- :mod:`~mimia.training.recipe`: :class:`TrainConfig`, lr schedule, parameter groups,
  augmentation (device, precision and process-group backend: :mod:`mimia.devices`);
- :mod:`~mimia.training.loop`: :func:`fit`, the one loop;
- :mod:`~mimia.training.engines`, :mod:`~mimia.training.dp`: what differs between one
  process, DDP and DP-SGD;
- :mod:`~mimia.training.early_stopping`: the selection run's epoch hook;
- :mod:`~mimia.training.resume`, :mod:`~mimia.training.ranks`,
  :mod:`~mimia.training.launch`: resume files, rank helpers, the DDP launcher;
- :mod:`~mimia.training.run`: :func:`run` and the three ways to fit a model it chooses
  between.
"""

from mimia.training.dp import PerSampleGradients
from mimia.training.early_stopping import heldout_loss, holdout_split
from mimia.training.loop import fit
from mimia.training.recipe import TrainConfig, lr_at, param_groups
from mimia.training.resume import read_resume, resume_path_for, save_resume
from mimia.training.run import run, save_trained, train_dp, train_early_stopped, train_mim

__all__ = [
    "PerSampleGradients",
    "TrainConfig",
    "fit",
    "heldout_loss",
    "holdout_split",
    "lr_at",
    "param_groups",
    "read_resume",
    "resume_path_for",
    "run",
    "save_resume",
    "save_trained",
    "train_dp",
    "train_early_stopped",
    "train_mim",
]
