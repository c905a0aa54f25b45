"""Features of fixed examples that no longer change in a run, computed once.

Two kinds, each passed to the steps in the batch instead of running the backbone again:

* ``'query'``: q(x), the frozen un-prompted model's [CLS] feature. L2P, DualPrompt,
  CODA-Prompt, HiDe-Prompt and S-Prompts match or route on it; SimpleCIL and RanPAC
  (without a first-session module) classify it; APER classifies it with its adapted half.
  For an example that is never augmented it is the same in every step of a run, so the
  loop computes it once -- the test sets once per run, a task's training data once per task
  when augmentation is off -- as ``batch['frozen_query']`` (read by
  :func:`pecft_jax.methods.common.frozen_query`).
* ``'fixed'``: a method's own feature that stops changing after a given task
  (``Method.features_fixed_after``): RanPAC's and APER's first-session adapted [CLS]
  feature, frozen after task 0. The test sets' are computed once, at the first evaluation
  that may use them, as ``batch['fixed_features']`` (read by
  :func:`pecft_jax.methods.common.cached_fixed_features`); without the cache every evaluation
  after task t ran the adapted backbone over t + 1 test sets again.
* ``'task'``: a method's features of a learnt task's pass (``Method.task_features_fixed``):
  Progressive Prompts' output at prompt ``j`` with prompts ``0..j``, EASE's subspace ``j``.
  An evaluation after task t reads passes 0..t of every test set so far
  (``Method.scored_passes``); each (test set, pass) is computed once, as
  ``batch['task_features']`` (read by :func:`pecft_jax.methods.common.cached_task_features`,
  assembled per batch by :class:`PassRows`): over T tasks T^2 passes over a test set's size
  instead of the sum of (t + 1)^2 (385 for 10 tasks, 100 with the cache).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence

import numpy as np


class FeatureCache:
    """Host-side ``(num_examples, D)`` float32 arrays, by name (``'query/test/3'``: task 3's
    test set's frozen queries; ``'query/train/3'``: its training examples' in task order;
    ``'fixed/test/3'``: its test set's fixed features; ``'task/1/test/3'``: its test set's
    features in task 1's pass), within ``max_bytes`` in all."""

    def __init__(self, *, shard: Callable[[dict], dict], gather: Callable[[Any], Any],
                 max_bytes: int):
        self._shard = shard
        self._gather = gather
        self.max_bytes = int(max_bytes)
        self._arrays: Dict[str, np.ndarray] = {}

    def fits(self, num_floats: int) -> bool:
        """Whether ``num_floats`` more float32 values stay within ``max_bytes`` in all."""
        held = sum(a.nbytes for a in self._arrays.values())
        return held + num_floats * 4 <= self.max_bytes

    def has(self, name: str) -> bool:
        return name in self._arrays

    def get(self, name: str, compute: Callable[[Any], Any],
            batches: Callable[[], Iterable[dict]]) -> np.ndarray:
        """The features of ``batches()``'s real examples in order, ``compute(inputs)`` of
        each sharded batch (run on first use only)."""
        return self.get_many({name: compute}, batches)[name]

    def get_many(self, computes: Mapping[str, Callable[[Any], Any]],
                 batches: Callable[[], Iterable[dict]]) -> Dict[str, np.ndarray]:
        """:meth:`get` of several arrays of the same examples: those not held yet are
        computed in one pass over ``batches()``, each batch read once for all of them."""
        todo = {name: compute for name, compute in computes.items()
                if name not in self._arrays}
        if todo:
            rows: Dict[str, list] = {name: [] for name in todo}
            for local in batches():
                batch = self._shard({"inputs": local["inputs"], "mask": local["mask"]})
                real = np.asarray(self._gather(batch["mask"])) > 0
                for name, compute in todo.items():
                    rows[name].append(np.asarray(self._gather(compute(batch["inputs"])))[real])
            for name, parts in rows.items():
                # no examples: (0, 0), which :func:`concatenate` leaves out
                self._arrays[name] = (np.concatenate(parts).astype(np.float32, copy=False)
                                      if parts else np.zeros((0, 0), np.float32))
        return {name: self._arrays[name] for name in computes}

    def drop(self, prefix: str) -> None:
        """Forgets the arrays whose name starts with ``prefix`` (a finished task's training
        queries)."""
        for name in [n for n in self._arrays if n.startswith(prefix)]:
            del self._arrays[name]


def concatenate(parts: Iterable[np.ndarray]) -> np.ndarray:
    """The cached arrays of consecutive parts of a stream as one (empty parts left out)."""
    parts = [part for part in parts if len(part)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


class PassRows:
    """The ``'task'`` features of a stream of test sets as the evaluation batches read them:
    row ``i`` is the stream's example ``i`` in every pass, ``(num_passes, W)``, zeros for
    the passes not given. Rows are assembled per batch from the cache's ``(n, W)`` array of
    each (test set, pass), so no ``(N, num_passes, W)`` array is built beside the cache.
    ``parts``: per test set in stream order, ``{pass: (n_i, W)}``; ``sizes``: the n_i."""

    def __init__(self, parts: Sequence[Mapping[int, np.ndarray]], sizes: Sequence[int],
                 num_passes: int, width: int):
        self.parts = list(parts)
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.shape = (int(self.offsets[-1]), num_passes, width)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        index = np.asarray(index)
        out = np.zeros((len(index),) + self.shape[1:], np.float32)
        # the test set of each row (an empty one shares its offset with the next: 'right'
        # skips it)
        part = np.searchsorted(self.offsets, index, side="right") - 1
        for p in np.unique(part):
            rows = part == p
            local = index[rows] - self.offsets[p]
            for j, features in self.parts[p].items():
                out[rows, j] = features[local]
        return out


def with_cached(local: dict, arrays: Mapping[str, Optional[np.ndarray]]) -> dict:
    """``local`` with, under each key of ``arrays`` that is not None, the cached row of each
    of its examples (by ``local['index']``; an evaluation stream's padding rows, whose
    positions run past the end, get the last row; a training batch's padding repeats its
    own examples' positions)."""
    out = local
    for key, rows in arrays.items():
        if rows is not None:
            out = dict(out, **{key: rows[np.minimum(local["index"], len(rows) - 1)]})
    return out
