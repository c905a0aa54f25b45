"""The frozen backbone's query features of fixed examples, computed once.

L2P, DualPrompt, CODA-Prompt, HiDe-Prompt and S-Prompts match or route on q(x), the frozen
un-prompted model's [CLS] feature; SimpleCIL and RanPAC (without a first-session module)
classify it. For an example that is never augmented it is the same in every step of a run,
so the loop computes it once -- the test sets once per run, a task's training data once per
task when augmentation is off -- and passes it in the batch (``batch['frozen_query']``, read
by :func:`pecft_jax.methods.common.frozen_query`) instead of running the backbone again.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional

import numpy as np

from pecft_jax import compiler
from pecft_jax.methods.common import FROZEN_QUERY, frozen_query


class FrozenQueryCache:
    """Host-side ``(num_examples, D)`` float32 query arrays, by name (``'test/3'``: task 3's
    test set; ``'train/3'``: its training examples in task order)."""

    def __init__(self, backbone, frozen, *, shard: Callable[[dict], dict],
                 gather: Callable[[Any], Any], max_bytes: int):
        # exactly what a method computes when no cached value is in the batch
        self._query = compiler.jit(lambda frozen, inputs: frozen_query(backbone, frozen,
                                                                       {"inputs": inputs}))
        self._frozen = frozen
        self._shard = shard
        self._gather = gather
        self.dim = backbone.feature_dim
        self.max_bytes = int(max_bytes)
        self._arrays: Dict[str, np.ndarray] = {}

    def fits(self, num_examples: int) -> bool:
        """Whether ``num_examples`` more rows stay within ``max_bytes`` in all."""
        held = sum(a.nbytes for a in self._arrays.values())
        return held + num_examples * self.dim * 4 <= self.max_bytes

    def has(self, name: str) -> bool:
        return name in self._arrays

    def get(self, name: str, batches: Callable[[], Iterable[dict]]) -> np.ndarray:
        """The queries of ``batches()``'s real examples in order (computed on first use)."""
        if name not in self._arrays:
            rows = []
            for local in batches():
                batch = self._shard({"inputs": local["inputs"], "mask": local["mask"]})
                query = np.asarray(self._gather(self._query(self._frozen, batch["inputs"])))
                rows.append(query[np.asarray(self._gather(batch["mask"])) > 0])
            self._arrays[name] = (np.concatenate(rows).astype(np.float32, copy=False) if rows
                                  else np.zeros((0, self.dim), np.float32))
        return self._arrays[name]

    def drop(self, prefix: str) -> None:
        """Forgets the arrays whose name starts with ``prefix`` (a finished task's training
        queries)."""
        for name in [n for n in self._arrays if n.startswith(prefix)]:
            del self._arrays[name]


def with_queries(local: dict, queries: Optional[np.ndarray]) -> dict:
    """``local`` with the cached query of each of its rows (by ``local['index']``; padding
    rows, whose positions run past the end, get the last row), or unchanged."""
    if queries is None:
        return local
    rows = np.minimum(local["index"], len(queries) - 1)
    return dict(local, **{FROZEN_QUERY: queries[rows]})
