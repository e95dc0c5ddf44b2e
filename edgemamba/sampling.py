"""Choosing the next token from logits: greedy, temperature, top-k, top-p, with a seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemamba.errors import EdgeMambaError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __post_init__(self):
        if self.temperature < 0:
            raise EdgeMambaError(f"temperature must be ≥ 0, got {self.temperature}")
        if self.top_k < 0:
            raise EdgeMambaError(f"top_k must be ≥ 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise EdgeMambaError(f"top_p must be in (0, 1], got {self.top_p}")


def non_finite_logits(count: int | None = None) -> EdgeMambaError:
    """The refusal to sample from NaN/inf logits (count: how many, where known)."""
    what = f"{count} NaN/inf logits" if count is not None else "NaN/inf logits"
    return EdgeMambaError(f"the model produced {what}; refusing to sample from them")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """One token from a (vocab,) row of logits."""
        if not np.all(np.isfinite(logits)):
            raise non_finite_logits(int(np.count_nonzero(~np.isfinite(logits))))
        p = self.params
        if p.greedy:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / p.temperature
        if p.top_k and p.top_k < z.size:
            kth = np.partition(z, -p.top_k)[-p.top_k]
            z = np.where(z < kth, -np.inf, z)
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, p.top_p)) + 1]  # smallest set with mass ≥ top_p
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(probs.size, p=probs))
