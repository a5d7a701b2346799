"""MIM architectures (MAE, SimMIM) and their checkpoints.

``mimia.models.spec`` is torch-free (the workflow reads architectures while it builds the
DAG); the models themselves load torch and timm on first use.
"""

from mimia.models.spec import ModelSpec

__all__ = ["MAE", "MIMModel", "ModelSpec", "SimMIM", "build_model"]


def build_model(spec: ModelSpec):
    from mimia.models.mae import MAE
    from mimia.models.simmim import SimMIM

    return {"mae": MAE, "simmim": SimMIM}[spec.recipe](spec)


def __getattr__(name: str):
    if name in ("MAE", "MIMModel", "SimMIM"):
        from mimia.models import base, mae, simmim

        return {"MAE": mae.MAE, "MIMModel": base.MIMModel, "SimMIM": simmim.SimMIM}[name]
    raise AttributeError(f"module 'mimia.models' has no attribute {name!r}")
