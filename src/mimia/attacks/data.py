"""``Observations``: what an attack sees of one audited model (the ``X`` of ``fit`` and
``score_samples``). It holds no membership labels: those are the separate ``y`` of ``fit``,
and ``score_samples`` takes none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PARTS = ("errors", "references", "similarities")
"""What an attack may declare it needs (``Attack.inputs``): the audited model's per-mask errors,
reference models' errors on the same samples and masks with their membership, or EncoderMI's
view similarities."""


@dataclass(frozen=True, eq=False)
class Observations:
    """Per-sample inputs of one audited model; every part is optional (see ``PARTS``).

    ``errors[n, r, k]``: reconstruction error of sample ``n`` under mask ``k`` at mask ratio
    ``mask_ratios[r]`` (lower = more likely member). ``reference_errors[m, n, r, k]``: the same
    sample and mask under reference model ``m`` (its own decoder); ``reference_in[m, n]``: ``n``
    trained model ``m``. ``M = 0`` reference models is allowed (built, but none exist).
    ``similarities[n, p]``: cosine similarities of the ``V(V-1)/2`` pairs of ``V`` augmented
    views' embeddings (EncoderMI). Shapes and finiteness are checked here.
    """

    sample_ids: np.ndarray
    errors: np.ndarray | None = None
    mask_ratios: tuple[float, ...] = ()
    reference_errors: np.ndarray | None = None
    reference_in: np.ndarray | None = None
    similarities: np.ndarray | None = None

    def __post_init__(self) -> None:
        def put(name, value):
            object.__setattr__(self, name, value)

        ids = np.asarray(self.sample_ids, dtype=str)
        if ids.ndim != 1:
            raise ValueError(f"sample_ids must be 1-D, got shape {ids.shape}")
        put("sample_ids", ids)
        n = len(ids)
        put("mask_ratios", tuple(float(r) for r in self.mask_ratios))
        if self.errors is not None:
            errors = np.asarray(self.errors, dtype=np.float64)
            if errors.ndim != 3 or errors.shape[0] != n:
                raise ValueError(f"errors must have shape [N={n}, R, K], got {errors.shape}")
            if errors.shape[1] != len(self.mask_ratios):
                raise ValueError(
                    f"errors has {errors.shape[1]} mask ratios, mask_ratios lists "
                    f"{len(self.mask_ratios)}: {self.mask_ratios}"
                )
            _check_finite(errors, "errors")
            put("errors", errors)
        elif self.mask_ratios:
            raise ValueError("mask_ratios given without errors")
        if (self.reference_errors is None) != (self.reference_in is None):
            raise ValueError("reference_errors and reference_in come together or not at all")
        if self.reference_errors is not None:
            if self.errors is None:
                raise ValueError("reference_errors need the audited model's errors")
            ref = np.asarray(self.reference_errors, dtype=np.float64)
            ref_in = np.asarray(self.reference_in)
            m = ref.shape[0] if ref.ndim == 4 else -1
            if ref.shape != (m, *self.errors.shape):
                dims = ", ".join(map(str, self.errors.shape))
                raise ValueError(f"reference_errors must have shape [M, {dims}], got {ref.shape}")
            if ref_in.shape != (m, n):
                raise ValueError(f"reference_in must have shape [M={m}, N={n}], got {ref_in.shape}")
            if ref_in.dtype != bool:
                raise ValueError(f"reference_in must be boolean, got dtype {ref_in.dtype}")
            _check_finite(ref, "reference_errors")
            put("reference_errors", ref)
            put("reference_in", ref_in)
        if self.similarities is not None:
            sim = np.asarray(self.similarities, dtype=np.float64)
            if sim.ndim != 2 or sim.shape[0] != n or sim.shape[1] < 1:
                raise ValueError(f"similarities must have shape [N={n}, P>=1], got {sim.shape}")
            _check_finite(sim, "similarities")
            put("similarities", sim)

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def parts(self) -> frozenset[str]:
        """The ``PARTS`` present."""
        have = {
            "errors": self.errors is not None,
            "references": self.reference_errors is not None,
            "similarities": self.similarities is not None,
        }
        return frozenset(p for p, present in have.items() if present)

    @property
    def num_masks(self) -> int:
        return 0 if self.errors is None else self.errors.shape[2]

    @property
    def num_references(self) -> int:
        return 0 if self.reference_errors is None else self.reference_errors.shape[0]

    def ratio_indices(self, ratios: Sequence[float] | float | None = None) -> np.ndarray:
        """Indices into ``mask_ratios`` of ``ratios`` (all when None); ValueError if absent."""
        if ratios is None:
            return np.arange(len(self.mask_ratios))
        if np.isscalar(ratios):
            ratios = [ratios]
        have = np.asarray(self.mask_ratios)
        idx = []
        for r in ratios:
            hit = np.flatnonzero(np.isclose(have, float(r), rtol=0, atol=1e-6))
            if len(hit) == 0:
                raise ValueError(f"mask ratio {r} not observed; have {self.mask_ratios}")
            idx.append(int(hit[0]))
        if not idx:
            raise ValueError("select at least one mask ratio")
        return np.asarray(idx)

    def subset(self, index) -> Observations:
        """The observations of the samples ``index`` selects (boolean mask or indices)."""
        index = np.asarray(index)

        def pick(a, axis=0):
            return None if a is None else (a[index] if axis == 0 else a[:, index])

        return Observations(
            sample_ids=self.sample_ids[index],
            errors=pick(self.errors),
            mask_ratios=self.mask_ratios,
            reference_errors=pick(self.reference_errors, 1),
            reference_in=pick(self.reference_in, 1),
            similarities=pick(self.similarities),
        )


def _check_finite(a: np.ndarray, what: str) -> None:
    if not np.isfinite(a).all():
        raise ValueError(f"{what} has {int((~np.isfinite(a)).sum())} non-finite values")
