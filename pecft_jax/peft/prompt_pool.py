"""Prompt pools with keys: the query-key selection of L2P (Wang et al., CVPR 2022), DualPrompt
(ECCV 2022) and the pool/key pieces of CODA-Prompt (CVPR 2023).

A pool is ``{'prompts': (M, L, D), 'keys': (M, D)}`` -- or ``(M, 2, L, D)`` prompts for a
prefix-style pool (DualPrompt's E-prompt). An input's query feature ``q(x)`` (usually the
frozen backbone's [CLS] feature) is compared to the keys by cosine similarity; the top-k
prompts are gathered and prepended; the selected keys are pulled towards the query.

Everything here is a pure function with static shapes, usable inside ``jit``.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array
POOL_INITS = ("uniform", "small_uniform", "normal", "orthogonal", "zeros")


def _sample(kind: str, key: Array, shape: tuple) -> Array:
    """Pool initialisers.

    * ``'uniform'``: ``U(-1, 1)`` -- DualPrompt's (and L2P-PyTorch's) ``'uniform'`` for
      prompts and keys.
    * ``'small_uniform'``: ``U[0, 0.01)`` -- flax's default ``nn.initializers.uniform()``,
      which the official L2P / DualPrompt JAX code uses for ``prompt_init='uniform'`` and
      ``prompt_key_init='uniform'`` (the same name as the prefix/prompt initialiser).
    * ``'normal'``: ``N(0, 0.02^2)``.
    * ``'orthogonal'``: rows (entries of the pool, flattened) orthonormal, as CODA-Prompt
      initialises its components and keys.
    * ``'zeros'``: L2P JAX's ``prompt_key_init='zero'``.
    """
    if kind == "uniform":
        return jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)
    if kind == "small_uniform":
        return jax.random.uniform(key, shape, jnp.float32, 0.0, 0.01)
    if kind == "normal":
        return 0.02 * jax.random.normal(key, shape, jnp.float32)
    if kind == "orthogonal":
        flat = (shape[0], math.prod(shape[1:]))
        if flat[0] > flat[1]:
            raise ValueError(f"orthogonal init needs pool size <= entry size, got {shape}")
        return jax.nn.initializers.orthogonal()(key, flat, jnp.float32).reshape(shape)
    if kind == "zeros":
        return jnp.zeros(shape, jnp.float32)
    raise ValueError(f"pool init must be one of {POOL_INITS}, got {kind!r}")


def init_pool(pool_size: int, length: int, dim: int, rng: Array, *,
              key_init: str = "uniform", prompt_init: str = "uniform",
              prefix: bool = False) -> dict:
    """A fresh pool ``{'prompts': (M, L, D) [or (M, 2, L, D) if prefix], 'keys': (M, D)}``.

    Defaults follow DualPrompt (``U(-1, 1)`` for prompts and keys); see ``_sample`` for the
    other options.
    """
    for name, value in (("pool_size", pool_size), ("length", length), ("dim", dim)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    k_prompts, k_keys = jax.random.split(rng)
    prompt_shape = (pool_size, 2, length, dim) if prefix else (pool_size, length, dim)
    return {"prompts": _sample(prompt_init, k_prompts, prompt_shape),
            "keys": _sample(key_init, k_keys, (pool_size, dim))}


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """``x / max(||x||, sqrt(eps))`` along ``axis`` (L2P's stabilised normalisation: a zero
    vector stays zero instead of becoming NaN)."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps))


def cosine_similarity(query: Array, keys: Array, eps: float = 1e-12) -> Array:
    """Cosine similarity ``(B, D) x (M, D) -> (B, M)``."""
    if query.ndim != 2 or keys.ndim != 2 or query.shape[-1] != keys.shape[-1]:
        raise ValueError(f"cosine_similarity expects query (B, D) and keys (M, D), got "
                         f"{tuple(query.shape)} and {tuple(keys.shape)}")
    return l2_normalize(query, eps=eps) @ l2_normalize(keys, eps=eps).T


def batch_mean(values: Array, weights: Optional[Array] = None) -> Array:
    """The mean of per-example ``values`` ``(B,)``; with ``weights`` (a batch's ``mask``: 1
    for an example, 0 for padding) the mean over the examples alone, as a PyTorch mean over
    a partial batch is: ``sum(w v) / sum(w)``, so each example's gradient is ``1 / sum(w)``
    and a padding row's 0."""
    if weights is None:
        return jnp.mean(values)
    weights = weights.astype(values.dtype)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def selection_counts(idx: Array, pool_size: int, weights: Optional[Array] = None) -> Array:
    """How often each pool entry appears in ``idx`` ``(B, k)`` -> ``(M,)`` int32; with
    ``weights`` ``(B,)`` (a batch mask), padding rows' selections are not counted."""
    if weights is None:
        return jnp.bincount(jnp.ravel(idx).astype(jnp.int32),
                            length=pool_size).astype(jnp.int32)
    per_row = jnp.broadcast_to(weights.reshape(-1, 1), idx.shape)
    counts = jnp.bincount(jnp.ravel(idx).astype(jnp.int32), weights=jnp.ravel(per_row),
                          length=pool_size)
    return jnp.round(counts).astype(jnp.int32)


def select_topk(similarity: Array, top_k: int, *, frequency_penalty: Optional[Array] = None,
                batchwise_prompt: bool = False, weights: Optional[Array] = None,
                group_size: int = 0) -> Array:
    """Indices ``(B, top_k)`` of the selected pool entries, best first.

    Args:
      similarity: ``(B, M)`` query-key cosine similarities.
      top_k: entries per example.
      frequency_penalty: optional ``(M,)`` selection counts accumulated over *previous* tasks
        (e.g. sums of :func:`selection_counts`). L2P's optional diversified selection
        (paper, Sec. 4.2) then picks the ``top_k`` smallest ``(1 - cos) * h`` where
        ``h = counts / sum(counts)`` is the normalised frequency: frequently used prompts look
        farther away, never used ones (``h = 0``) come first (ties go to the lower index).
        With all counts zero the plain similarity ranking is used. Use it while training
        only, as the paper does.
      batchwise_prompt: L2P's batch-wise selection (official code, on by default in its
        configs): the ``top_k`` ids chosen most often across the batch are used for every
        example (ties go to the lower id).
      weights: optional ``(B,)`` votes of the examples in the batch-wise count (the batch
        mask: padding rows, which the official code never has, do not vote).
      group_size: the batch-wise vote runs within consecutive groups of this many examples
        (the official JAX code votes within each device's batch: 16 for L2P, 24 for
        DualPrompt); 0 = one vote over the whole batch.
    """
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be (B, M), got {tuple(similarity.shape)}")
    pool_size = similarity.shape[1]
    if not isinstance(top_k, int) or not 0 < top_k <= pool_size:
        raise ValueError(f"top_k must be an int in [1, pool size {pool_size}], got {top_k!r}")
    score = similarity
    if frequency_penalty is not None:
        counts = jnp.asarray(frequency_penalty, jnp.float32)
        if counts.shape != (pool_size,):
            raise ValueError(f"frequency_penalty must be ({pool_size},) counts, got "
                             f"{tuple(counts.shape)}")
        total = jnp.sum(counts)
        freq = jnp.where(total > 0, counts / jnp.maximum(total, 1.0), 1.0)
        score = -(1.0 - similarity) * freq  # larger is better
    _, idx = jax.lax.top_k(score, top_k)
    if batchwise_prompt:
        batch = idx.shape[0]
        size = int(group_size) if group_size else batch
        if size < 0:
            raise ValueError(f"group_size must be >= 0, got {group_size}")
        group = jnp.arange(batch) // size  # (B,) the vote each example takes part in
        votes_of = jax.nn.one_hot(group, -(-batch // size), dtype=jnp.float32)  # (B, G)
        if weights is not None:
            votes_of = votes_of * jnp.asarray(weights, jnp.float32)[:, None]
        votes = jnp.einsum("bkm,bg->gm", jax.nn.one_hot(idx, pool_size, dtype=jnp.float32),
                           votes_of)
        _, major = jax.lax.top_k(votes, top_k)  # (G, top_k)
        idx = major[group]
    return idx


def gather_prompts(prompts: Array, idx: Array) -> Array:
    """Concatenate the selected pool entries per example.

    ``(M, L, D)`` prompts with ``(B, k)`` indices -> ``(B, k*L, D)`` (entry order = index
    order); ``(M, 2, L, D)`` prefix pools -> ``(B, 2, k*L, D)`` (key and value halves stay
    apart, ready for :func:`pecft_jax.peft.prompts.prefix_context`).
    """
    if idx.ndim != 2:
        raise ValueError(f"idx must be (B, k), got {tuple(idx.shape)}")
    picked = jnp.take(prompts, idx, axis=0)  # (B, k, ...)
    batch, k = idx.shape
    if prompts.ndim == 3:
        _, length, dim = prompts.shape
        return picked.reshape(batch, k * length, dim)
    if prompts.ndim == 4 and prompts.shape[1] == 2:
        _, _, length, dim = prompts.shape
        return jnp.swapaxes(picked, 1, 2).reshape(batch, 2, k * length, dim)
    raise ValueError(f"prompts must be (M, L, D) or a prefix pool (M, 2, L, D), got "
                     f"{tuple(prompts.shape)}")


def key_matching_loss(query: Array, keys: Array, idx: Array,
                      weights: Optional[Array] = None) -> Array:
    """L2P's surrogate (pull-constraint) loss: mean over the batch of the sum over the
    selected keys of ``1 - cos(q(x), k_i)``.

    The official L2P code subtracts ``reduce_sim = sum_{b, selected} cos / B`` from the loss
    (``pull_constraint_coeff = 1``); this function returns ``top_k - reduce_sim``, the same
    reduction and the same gradient, written as a non-negative distance. Gradients reach
    ``keys`` (and ``query`` unless the caller stops them, as L2P does with the frozen
    model's feature). ``weights``: the batch mask, the mean over its examples
    (:func:`batch_mean`).
    """
    if idx.ndim != 2 or idx.shape[0] != query.shape[0]:
        raise ValueError(f"idx must be (B={query.shape[0]}, k), got {tuple(idx.shape)}")
    cos = cosine_similarity(query, keys)
    selected = jnp.take_along_axis(cos, idx, axis=1)
    return batch_mean(jnp.sum(1.0 - selected, axis=1), weights)
