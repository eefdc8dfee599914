"""Best-of-N sampling: draw N candidates per prompt and keep the one an image–text scorer rates
highest — DALL·E's CLIP reranking (Ramesh et al. 2021), with whatever scorer a task holds (the
``ar`` task: its frozen SigLIP).

Candidates are laid out prompt-major: prompt i's are rows ``i·n … i·n + n − 1`` of the expanded
batch (``repeat``), each drawn with a key of its own. A task draws the first candidate of every
prompt with the keys it uses without reranking, so ``Reranked.first`` is exactly the plain
sampler's output, reported beside the reranked figures.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, TypeVar

import numpy as np

T = TypeVar("T")


def repeat(prompts: Sequence[T], n: int) -> list[T]:
    """Each prompt ``n`` times in a row (the candidates' layout)."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return [p for p in prompts for _ in range(n)]


@dataclasses.dataclass(frozen=True)
class Reranked:
    """The choice among ``n`` candidates per prompt: ``scores`` [K, n], ``chosen`` [K] the row of
    each prompt's best candidate in the expanded batch (ties: the earliest draw)."""

    scores: np.ndarray
    chosen: np.ndarray

    @property
    def n(self) -> int:
        return self.scores.shape[1]

    def best(self, candidates: np.ndarray) -> np.ndarray:
        """[K, …] the chosen rows of ``candidates`` [K·n, …]."""
        return np.asarray(candidates)[self.chosen]

    def first(self, candidates: np.ndarray) -> np.ndarray:
        """[K, …] every prompt's first draw (the plain sampler's output, drawn as above)."""
        return np.asarray(candidates)[::self.n]


def rerank(scores: np.ndarray, n: int) -> Reranked:
    """The best of each prompt's ``n`` candidates by ``scores`` [K·n] (higher is better)."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 1 or n < 1 or scores.shape[0] % n:
        raise ValueError(f"rerank: scores must be [K·n] for n={n}, got shape {scores.shape}")
    grouped = scores.reshape(-1, n)
    return Reranked(scores=grouped, chosen=np.arange(grouped.shape[0]) * n + np.argmax(grouped, axis=1))
