"""MIM architectures (MAE, SimMIM) and their checkpoints."""

from mimia.models.base import MIMModel
from mimia.models.mae import MAE
from mimia.models.simmim import SimMIM
from mimia.models.spec import ModelSpec


def build_model(spec: ModelSpec) -> MIMModel:
    return {"mae": MAE, "simmim": SimMIM}[spec.recipe](spec)


__all__ = ["MAE", "MIMModel", "ModelSpec", "SimMIM", "build_model"]
