"""CODA-Prompt: COntinual Decomposed Attention-based Prompting (Smith et al., CVPR 2023).

Algorithm (paper Sec. 4, official code's defaults in brackets):

* at each prefix layer [blocks 0-4] a set of M prompt components P_m (length L_p) with keys
  K_m and attention vectors A_m (both D-dim)  [M=100, L_p=8];
* query q(x) = the frozen pretrained model's [CLS] feature;
* weights alpha_m = cos(q ⊙ A_m, K_m) and prompt p(x) = sum_m alpha_m P_m: no selection,
  fully differentiable end to end;
* p(x) is used by prefix tuning, its first L_p/2 tokens as keys and the last L_p/2 as
  values [4 + 4];
* components are split evenly over the tasks (M / T each): task t trains its own slice, the
  earlier slices are used but frozen, later ones are not used yet;
* a new slice is initialised orthogonal to all earlier components by Gram-Schmidt (P
  flattened to L_p*D), separately for P, K and A [``orthogonalize='official'``: the
  official code's classical Gram-Schmidt, projecting a draw onto each earlier component
  separately, exact only while those are orthogonal; ``'exact'`` (the default): onto an
  orthonormal basis of their span];
* optional orthogonality penalty mu * sum ||B B^T - I||^2 / n^2 over B in {K, A, P}
  [official ``ortho_mu``: 0 with the current code; the paper's first version used 0.1 on an
  orthogonal init];
* classifier: a linear head on the prompted model's [CLS] output; CE over the current task's
  classes (earlier and later classes masked).

Trainable tree: ``components/<task>/<layer>/{prompts (M/T, L_p, D), keys (M/T, D),
attention (M/T, D)}`` plus ``head``. Each task's slice is its own set of leaves; the step
stacks all M components (those of later tasks weigh 0) and ``update_mask`` gives every
slice but the current task's a zero gradient and a zero update, so old components stay
bit-identical and one compiled step serves every task.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pecft_jax.methods.base import (Method, TaskSpec, apply_linear_head,
                                    init_linear_head, mask_current_task)
from pecft_jax.methods.common import frozen_query, prompted_cls_token
from pecft_jax.backbones.context import resolve_layers
from pecft_jax.peft.prompts import prefix_context

COMPONENT_FIELDS = ("prompts", "keys", "attention")


# ----------------------------------------------------------------------------- the mechanics
def component_weights(query, keys, attention, eps: float = 1e-12):
    """alpha ``(B, M)``: cosine similarity between the attended query ``q ⊙ A_m`` and ``K_m``.

    query ``(B, D)``, keys and attention ``(M, D)``. The same value as normalising
    ``q ⊙ A_m`` and ``K_m`` (as ``peft.prompt_pool.l2_normalize`` does, with its ``eps``)
    and taking their dot product, computed without the ``(B, M, D)`` tensor ``q ⊙ A_m``:
    the numerator is ``q @ (A ⊙ K)^T`` and ``||q ⊙ A_m||^2 = (q ⊙ q) @ (A ⊙ A)^T`` (a sum
    of non-negative terms), two ``(B, D) x (D, M)`` products. Materialising ``(B, M, D)``
    and its gradient made the demo's whole training step about 1.5x slower on CPU."""
    # full float32 products: on a GPU / TPU the default precision (TF32 / bf16 passes) would
    # round these sums, which the elementwise form did not (their cost is negligible)
    highest = jax.lax.Precision.HIGHEST
    numerator = jnp.einsum("bd,md->bm", query, attention * keys, precision=highest)
    attended_sq = jnp.einsum("bd,md->bm", jnp.square(query), jnp.square(attention),
                             precision=highest)
    keys_sq = jnp.sum(jnp.square(keys), axis=-1)
    return (numerator * jax.lax.rsqrt(jnp.maximum(attended_sq, eps))
            * jax.lax.rsqrt(jnp.maximum(keys_sq, eps))[None, :])


def assemble_prompt(alpha, prompts):
    """``sum_m alpha_m P_m``: ``(B, M)`` x ``(M, L, D)`` -> ``(B, L, D)``."""
    return jnp.einsum("bm,mld->bld", alpha, prompts)


def as_prefix(prompt):
    """``(B, L, D)`` -> ``(B, 2, L/2, D)``: first half keys, second half values."""
    batch, length, dim = prompt.shape
    return prompt.reshape(batch, 2, length // 2, dim)


def orthogonality_penalty(matrix, active=None):
    """``mean((B B^T - I)^2)`` over the rows of ``matrix`` flattened to ``(n, -1)`` -- only
    the rows where ``active`` (``(n,)`` bools, possibly traced) is true, if given."""
    flat = matrix.reshape(matrix.shape[0], -1)
    squared = jnp.square(flat @ flat.T - jnp.eye(flat.shape[0], dtype=flat.dtype))
    if active is None:
        return jnp.mean(squared)
    pairs = (active[:, None] & active[None, :]).astype(flat.dtype)
    return jnp.sum(squared * pairs) / jnp.sum(pairs)


def gram_schmidt_extend(old: np.ndarray, count: int, rng) -> np.ndarray:
    """``count`` new unit rows orthogonal to every row of ``old`` and to each other.

    ``old`` is ``(m, ...)`` (rows flattened); the result has shape ``(count, ...)``; ``rng`` is
    a ``numpy.random.Generator``. Gaussian draws are orthogonalised against an orthonormal
    basis of the old rows' span, so the result is orthogonal to the old components even when
    those, after training, are no longer orthogonal among themselves (the official code
    projects onto each old component separately, which is exact only for orthogonal ones);
    two passes, in float64, for numerical accuracy."""
    old = np.asarray(old, np.float64)
    shape = old.shape[1:]
    dim = int(np.prod(shape))
    flat = old.reshape(old.shape[0], dim)
    if flat.shape[0] + count > dim:
        raise ValueError(f"cannot make {flat.shape[0] + count} components of size {dim} "
                         f"orthogonal; use fewer components (pool_size) or a wider backbone")
    basis = []
    for row in flat:  # orthonormal basis of span(old), skipping dependent rows
        v = row.copy()
        for _ in range(2):
            for b in basis:
                v -= (b @ v) * b
        norm = np.linalg.norm(v)
        if norm > 1e-10 * max(np.linalg.norm(row), 1e-30):
            basis.append(v / norm)
    new = []
    while len(new) < count:
        v = rng.standard_normal(dim)
        for _ in range(2):
            for b in basis:
                v -= (b @ v) * b
        norm = np.linalg.norm(v)
        if norm < 1e-6:  # the official code restarts the draw in this case
            continue
        v /= norm
        basis.append(v)
        new.append(v)
    return np.stack(new).reshape((count,) + shape).astype(np.float32)


def classical_gram_schmidt_extend(old: np.ndarray, count: int, rng) -> np.ndarray:
    """:func:`gram_schmidt_extend` as the official ``tensor_prompt``'s ``gram_schmidt``
    computes it (``models/zoo.py:104-122``): each new row is a Gaussian draw minus its
    projection ``(v . u) / (u . u) u`` onto every earlier row ``u`` separately -- the old
    ones as trained, and the new ones before they are normalised -- then normalised. Exactly
    orthogonal to the old rows only while those are orthogonal among themselves."""
    old = np.asarray(old, np.float64)
    shape = old.shape[1:]
    dim = int(np.prod(shape))
    if old.shape[0] + count > dim:
        raise ValueError(f"cannot make {old.shape[0] + count} components of size {dim} "
                         f"orthogonal; use fewer components (pool_size) or a wider backbone")
    earlier = list(old.reshape(old.shape[0], dim))
    if any(u @ u < 1e-8 for u in earlier):  # the official code would redraw forever
        raise ValueError("an earlier component is zero: nothing to project a new one onto")
    new = []
    for _ in range(count):
        v = rng.standard_normal(dim)
        u = v - sum(((v @ e) / (e @ e) * e for e in earlier), np.zeros(dim))
        earlier.append(u)
        new.append(u / np.linalg.norm(u))
    return np.stack(new).reshape((count,) + shape).astype(np.float32)


ORTHOGONALIZE = {"exact": gram_schmidt_extend, "official": classical_gram_schmidt_extend}


# ----------------------------------------------------------------------------- the method
class CodaPrompt(Method):
    name = "coda_prompt"
    train_class_mask = "task"  # official: logits of earlier tasks' classes set to -inf
    uses_frozen_query = True

    @dataclasses.dataclass(frozen=True)
    class Config:
        pool_size: int = 100                        # M, split evenly over the tasks
        prompt_length: int = 8                      # L_p: 4 key + 4 value tokens
        layers: Tuple[int, ...] = (0, 1, 2, 3, 4)
        ortho_mu: float = 0.0
        # how a new slice is made orthogonal to the earlier ones: 'exact' (an orthonormal
        # basis of their span) or 'official' (zoo.py's classical Gram-Schmidt)
        orthogonalize: str = "exact"

        def __post_init__(self):
            if self.orthogonalize not in ORTHOGONALIZE:
                raise ValueError(f"coda_prompt orthogonalize={self.orthogonalize!r} must be one "
                                 f"of {sorted(ORTHOGONALIZE)}")
            if self.prompt_length <= 0 or self.prompt_length % 2:
                raise ValueError(f"coda_prompt prompt_length={self.prompt_length} must be a "
                                 f"positive even number: half the tokens are prefix keys, half "
                                 f"values")

    def __init__(self, config, backbone, num_classes, num_tasks):
        super().__init__(config, backbone, num_classes, num_tasks)
        pool_size = self.config.pool_size
        self.layers = resolve_layers(self.config.layers, backbone.config.num_layers,
                                     "coda_prompt layers")
        if pool_size <= 0 or pool_size % num_tasks:
            raise ValueError(f"coda_prompt pool_size={pool_size} must be a positive multiple "
                             f"of the number of tasks ({num_tasks}): components are split evenly "
                             f"over the tasks")
        if pool_size > backbone.feature_dim:
            raise ValueError(f"coda_prompt pool_size={pool_size} exceeds the feature width "
                             f"{backbone.feature_dim}: that many keys/attention vectors cannot be "
                             f"mutually orthogonal; lower method.pool_size")
        self.per_task = pool_size // num_tasks

    # ------------------------------------------------------------------ set-up
    def init(self, rng, frozen):
        # Every task's slice exists from the start (zeros until its task begins, as in the
        # official code) so the tree's structure never changes; before_task fills slice t.
        dim, length = self.backbone.feature_dim, self.config.prompt_length
        def zeros():  # distinct host buffers per leaf (the train step donates its arguments)
            return {"prompts": np.zeros((self.per_task, length, dim), np.float32),
                    "keys": np.zeros((self.per_task, dim), np.float32),
                    "attention": np.zeros((self.per_task, dim), np.float32)}

        components = {str(t): {str(layer): zeros() for layer in self.layers}
                      for t in range(self.num_tasks)}
        return {"components": components,
                "head": init_linear_head(rng, dim, self.num_classes)}, {}

    def before_task(self, task, trainable, state, frozen, data, rng):
        t = task.index
        # numpy from here on: a host-side initialisation that compiles nothing
        seed = [int(x) for x in np.asarray(jax.random.key_data(rng)).ravel()]
        new_slice = {}
        for layer in self.layers:
            key = str(layer)
            fields = {}
            for i, field in enumerate(COMPONENT_FIELDS):
                old = [np.asarray(trainable["components"][str(s)][key][field]) for s in range(t)]
                old = (np.concatenate(old) if old else
                       np.zeros((0,) + tuple(trainable["components"]["0"][key][field].shape[1:]),
                                np.float32))
                fields[field] = ORTHOGONALIZE[self.config.orthogonalize](
                    old, self.per_task, np.random.default_rng(seed + [layer, i]))
            new_slice[key] = fields
        components = dict(trainable["components"], **{str(t): new_slice})
        return dict(trainable, components=components), state

    # -------------------------------------------------------------- optimiser
    def update_mask(self, trainable, task):
        """Only task t's slice of components (and the head) learns while task t trains; the
        other slices are in the one compiled step with a zero mask."""
        return {"components": mask_current_task(trainable["components"], task.index),
                "head": jax.tree_util.tree_map(lambda _: jnp.float32(1), trainable["head"])}

    # ------------------------------------------------------------ the forward
    def components(self, trainable, task_index, train: bool):
        """Per layer: P, K, A of every task's slice stacked, ``(M, L, D)``, ``(M, D)``,
        ``(M, D)``, and ``(M,)`` whether each component belongs to tasks 0..task_index (the
        index may be traced). While training, earlier tasks' slices are behind
        ``stop_gradient``."""
        owner = np.repeat(np.arange(self.num_tasks), self.per_task)  # task of each component
        active = jnp.asarray(owner) <= task_index
        earlier = jnp.asarray(owner) < task_index
        out = {}
        for layer in self.layers:
            key = str(layer)
            stacked = {field: jnp.concatenate([trainable["components"][str(s)][key][field]
                                               for s in range(self.num_tasks)])
                       for field in COMPONENT_FIELDS}
            if train:
                stacked = {field: jnp.where(earlier.reshape((-1,) + (1,) * (x.ndim - 1)),
                                            jax.lax.stop_gradient(x), x)
                           for field, x in stacked.items()}
            out[key] = dict(stacked, active=active)
        return out

    def context(self, components, q):
        """Prefix context of the assembled prompts, ``{layer: (B, 2, L/2, D)}``; components of
        later tasks get weight 0 (exactly what leaving them out would give)."""
        prefixes = {}
        for layer, c in components.items():
            alpha = jnp.where(c["active"][None, :],
                              component_weights(q, c["keys"], c["attention"]), 0.0)
            prefixes[layer] = as_prefix(assemble_prompt(alpha, c["prompts"]))
        return prefix_context(prefixes)

    def _logits(self, trainable, frozen, batch, task_index, train):
        q = frozen_query(self.backbone, frozen, batch)
        components = self.components(trainable, task_index, train)
        feature = prompted_cls_token(self.backbone, frozen, batch["inputs"],
                                     self.context(components, q))
        return apply_linear_head(trainable["head"], feature), components

    def loss(self, trainable, state, frozen, batch, rng, task: TaskSpec):
        logits, components = self._logits(trainable, frozen, batch, task.index, True)
        ce = self.masked_ce(logits, batch, task)
        accuracy = self.train_accuracy(logits, batch, task)
        loss, metrics = ce, {"ce": ce, "accuracy": accuracy}
        if self.config.ortho_mu > 0:
            ortho = sum(orthogonality_penalty(c[field], c["active"]) for c in components.values()
                        for field in COMPONENT_FIELDS)
            loss = loss + self.config.ortho_mu * ortho
            metrics["ortho"] = ortho
        return loss, {"metrics": metrics}

    def logits(self, trainable, state, frozen, batch, task):
        return self._logits(trainable, frozen, batch, task.index, False)[0]
