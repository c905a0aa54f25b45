"""EASE: Expandable Subspace Ensemble (Zhou et al., "Expandable Subspace Ensemble for
Pre-Trained Model-Based Class-Incremental Learning", CVPR 2024; official code
sun-hailong/CVPR24-Ease, ``models/ease.py``, ``backbone/vit_ease.py``,
``backbone/linears.py``).

Algorithm, per task ``t``:

* **A new subspace.** A fresh AdaptFormer adapter set ``A_t`` (bottleneck 64 in every
  block, parallel to the MLP, scale 0.1, dropout 0.1; up-projection 0, so it starts as the
  pre-trained model) is trained on the task with the backbone and every earlier adapter
  frozen, through a temporary cosine classifier ``sigma * cos(f, w)`` (learnable ``sigma``
  from 1) over the task's classes, by cross-entropy; the classifier is then dropped.
  ``phi_j(x)`` is the [CLS] feature (after the final LayerNorm) of a full pass with only
  ``A_j`` active; the representation is ``[phi_0(x), ..., phi_t(x)]``.
* **Prototypes.** Every new class gets its real prototype -- the mean of ``phi_j`` over its
  un-augmented training images -- in *every* subspace ``j <= t``.
* **Semantic-guided prototype complement.** An old class (task ``i < t``) has no images
  left, so its prototype in a newer subspace ``k`` is synthesised from classes that have
  one there: with ``R`` the reference classes, ``S = softmax_r(cos(p_c^i, p_r^i))`` --
  similarity in the old class's own subspace ``i`` -- and ``p_c^k = sum_r S_cr p_r^k``.
  The official configs (``recalc_sim: true``) redo this each task for every old task ``i``
  and every newer subspace ``k``, with ``R`` = the classes of tasks ``k..t``;
  ``recalc_sim=False`` is the paper's form (only the newest subspace, ``R`` = the current
  task's classes).
* **Subspace-reweighted prediction.** Per subspace cosine,
  ``logit_c = cos(phi_g, p_c^g) + (alpha / t) sum_{j != g, j <= t} cos(phi_j, p_c^j)``
  with ``g`` the task that taught ``c`` (alpha 0.1; the official ``forward_reweight``
  divides alpha by the task index ``t``, which the paper's equation does not:
  ``alpha_over_tasks``).

Options of the official code kept as options: ``use_init_ptm`` (the pre-trained model's
[CLS] as one more subspace, weighted ``beta``), ``use_diagonal`` (the ablation: a class's
prototype only in its own task's subspace, no complement -- it scores 0 in the others).

Fixed shapes: every task's adapter is in the trainable tree from the start, stacked on a
leading task axis (``update_mask`` lets only the current one learn, so the earlier ones
stay bit-identical); the subspaces not yet trained are skipped at run time
(``lax.cond``), so task ``t`` costs ``t + 1`` backbone passes per image, and one compiled
step serves every task. Prototypes live in a ``(C, T, D)`` array. A trained subspace never
changes (``task_features_fixed``): the loop computes each test set's ``phi_j`` once, when
first needed, and the evaluations read them (the official code runs every subspace over
the test set again after each task).

Trainable: ``T`` adapter sets and the temporary classifier. State: prototypes ``(C, T, D)``
(plus ``(C, D)`` with ``use_init_ptm``) and per-class image counts.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pecft_jax import peft
from pecft_jax.methods.base import (Method, TaskSpec, config_field, count_params,
                                    mask_task_slice)
from pecft_jax.methods.common import cached_task_features, frozen_query, num_examples
from pecft_jax.peft.per_task import init_per_task
from pecft_jax.peft.prompt_pool import cosine_similarity, l2_normalize

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST


def complement_prototypes(prototypes: np.ndarray, task_classes: Sequence[Sequence[int]],
                          t: int, *, recalc: bool = True) -> np.ndarray:
    """EASE's semantic-guided prototype complement after task ``t``.

    ``prototypes[c, j]`` is class ``c``'s prototype in subspace ``j``: real -- a mean of its
    images' features -- in the subspaces ``0..i`` that existed when its task ``i`` was
    learnt, to be synthesised in the later ones. For every old task ``i < t`` and subspace
    ``k`` (``i < k <= t`` with ``recalc``, the official ``solve_sim_reset``; only ``k = t``
    without, ``solve_similarity``), with ``R`` the reference classes (tasks ``k..t``, resp.
    task ``t``), whose prototypes in subspaces ``i`` and ``k`` are real::

        S = softmax_r(cos(P[C_i, i], P[R, i]))       # in the old classes' own subspace
        P[C_i, k] = S @ P[R, k]

    Every right-hand side is a real prototype, so the order of the loops does not matter.
    Returns a new array."""
    p = np.array(prototypes, np.float64, copy=True)

    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)

    for i in range(t):
        old = list(task_classes[i])
        for k in (range(i + 1, t + 1) if recalc else (t,)):
            ref = [c for tk in range(k if recalc else t, t + 1) for c in task_classes[tk]]
            sim = unit(p[old, i]) @ unit(p[ref, i]).T
            sim = np.exp(sim - sim.max(1, keepdims=True))
            p[old, k] = (sim / sim.sum(1, keepdims=True)) @ p[ref, k]
    return p.astype(np.float32)


def subspace_weights(task_of_class: np.ndarray, num_tasks: int, t, alpha: float,
                     alpha_over_tasks: bool = True) -> Array:
    """``(C, T)`` weights of each class's cosine in each subspace after task ``t`` (may be
    traced): 1 in the class's own task's subspace, ``alpha / t`` (``alpha`` without
    ``alpha_over_tasks``) in the other trained ones, 0 in those not trained yet."""
    j = np.arange(num_tasks)[None, :]
    core = jnp.asarray(j == np.asarray(task_of_class)[:, None], jnp.float32)
    trained = (jnp.asarray(j) <= t).astype(jnp.float32)
    other = alpha / jnp.maximum(t, 1) if alpha_over_tasks else jnp.float32(alpha)
    other = jnp.where(t > 0, other, 0.0)
    return core + other * (1.0 - core) * trained


class EASE(Method):
    name = "ease"
    train_class_mask = "task"  # the temporary classifier covers the task's classes only
    task_features_fixed = True  # subspace j: adapter j never moves after task j

    @dataclasses.dataclass(frozen=True)
    class Config:
        # official inc_net.py / vit_ease.py: ffn_num 64, parallel, scalar 0.1, dropout 0.1,
        # 'lora' init (down U(+-1/sqrt(D)), up and biases 0), every block
        adapter: peft.AdapterConfig = config_field(
            lambda: peft.AdapterConfig(bottleneck_dim=64, mode="parallel", scale=0.1,
                                       dropout=0.1))
        alpha: float = 0.1               # official json "alpha"
        alpha_over_tasks: bool = True    # official linears.py: alpha / cur_task
        recalc_sim: bool = True          # official json "recalc_sim"
        use_diagonal: bool = False       # official json "use_diagonal" (ablation)
        use_init_ptm: bool = False       # official json "use_init_ptm"
        beta: float = 0.0                # official json "beta" (weight of the PTM subspace)

        def __post_init__(self):
            if self.alpha < 0 or self.beta < 0:
                raise ValueError(f"ease alpha and beta must be >= 0, got {self.alpha} and "
                                 f"{self.beta}")

    def __init__(self, config, backbone, num_classes, num_tasks):
        super().__init__(config, backbone, num_classes, num_tasks)
        self.uses_frozen_query = self.config.use_init_ptm

    # ------------------------------------------------------------------ set-up
    def init(self, rng, frozen):
        k_adapters, k_proxy = jax.random.split(rng)
        adapters = init_per_task(
            lambda key: peft.init_adapters(self.backbone.config, self.config.adapter, key),
            k_adapters, self.num_tasks, stacked=True)
        dim = self.backbone.feature_dim
        state = {"prototypes": jnp.zeros((self.num_classes, self.num_tasks, dim), jnp.float32),
                 "count": jnp.zeros((self.num_classes,), jnp.float32)}
        if self.config.use_init_ptm:
            state["ptm"] = jnp.zeros((self.num_classes, dim), jnp.float32)
        return {"adapters": adapters, "proxy": self.init_proxy(k_proxy)}, state

    def init_proxy(self, rng) -> dict:
        """The task's temporary classifier: the official ``CosineLinear`` (``U(+-1/sqrt(D))``
        weights, learnable ``sigma`` from 1)."""
        dim = self.backbone.feature_dim
        bound = 1.0 / np.sqrt(dim)
        return {"kernel": jax.random.uniform(rng, (dim, self.num_classes), jnp.float32,
                                             -bound, bound),
                "sigma": jnp.ones((), jnp.float32)}

    def before_task(self, task, trainable, state, frozen, data, rng):
        return dict(trainable, proxy=self.init_proxy(rng)), state  # a fresh one each task

    def update_mask(self, trainable, task):
        """Only the current task's adapter (slice ``t`` of the stacked ones) and the
        temporary classifier learn."""
        return {"adapters": mask_task_slice(trainable["adapters"], task.index, self.num_tasks),
                "proxy": jax.tree_util.tree_map(lambda _: jnp.float32(1), trainable["proxy"])}

    # ------------------------------------------------------------------ traced
    def subspace(self, adapters, frozen, images, j, deterministic=True, rng=None) -> Array:
        """``phi_j(x)``: [CLS] of a pass with only adapter ``j`` (may be traced) active."""
        chosen = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[j], adapters)
        return self.backbone.apply(frozen, images, peft.adapter_context(chosen,
                                                                        self.config.adapter),
                                   output="cls", deterministic=deterministic, dropout_rng=rng)

    def all_subspaces(self, adapters, frozen, images, t) -> Array:
        """``(T, B, D)``: ``phi_j(x)`` for ``j <= t``, zeros for the subspaces not trained yet
        (skipped, not computed)."""
        shape = (num_examples(images), self.backbone.feature_dim)

        def one(j):
            return jax.lax.cond(j <= t, lambda: self.subspace(adapters, frozen, images, j)
                                .astype(jnp.float32), lambda: jnp.zeros(shape, jnp.float32))

        return jax.lax.map(one, jnp.arange(self.num_tasks))

    def loss(self, trainable, state, frozen, batch, rng, task: TaskSpec):
        f = self.subspace(trainable["adapters"], frozen, batch["inputs"], task.index,
                          deterministic=False, rng=rng)
        proxy = trainable["proxy"]
        logits = proxy["sigma"] * cosine_similarity(f, proxy["kernel"].T)
        ce = self.masked_ce(logits, batch, task)
        return ce, {"metrics": {"accuracy": self.train_accuracy(logits, batch, task)}}

    def task_features(self, trainable, state, frozen, inputs, task: TaskSpec):
        """``phi_j(x)`` of task ``j``'s subspace: fixed once its adapter is trained (the
        loop computes it once per test set, ``task_features_fixed``)."""
        return self.subspace(trainable["adapters"], frozen, inputs, task.index)

    def logits(self, trainable, state, frozen, batch, task: TaskSpec):
        c = self.config
        phi = l2_normalize(cached_task_features(batch, lambda: jnp.swapaxes(self.all_subspaces(
            trainable["adapters"], frozen, batch["inputs"], task.index), 0, 1)))  # (B, T, D)
        cos = jnp.einsum("bjd,cjd->bcj", phi, l2_normalize(state["prototypes"]))  # (B, C, T)
        weights = subspace_weights(task.task_of_class(), self.num_tasks, task.index, c.alpha,
                                   c.alpha_over_tasks)
        logits = jnp.einsum("bcj,cj->bc", cos, weights)
        if c.use_init_ptm:
            logits = logits + c.beta * cosine_similarity(
                frozen_query(self.backbone, frozen, batch), state["ptm"])
        return logits

    # -------------------------------------------------------------- after task
    def after_task(self, task, trainable, state, frozen, data, rng):
        t, dim = task.index, self.backbone.feature_dim
        zeros = {"sum": jnp.zeros((self.num_classes, self.num_tasks, dim), jnp.float32),
                 "count": jnp.zeros((self.num_classes,), jnp.float32)}
        if self.config.use_init_ptm:
            zeros["ptm"] = jnp.zeros((self.num_classes, dim), jnp.float32)
        sums = jax.device_get(data.reduce(self.accumulate, zeros, trainable["adapters"],
                                          frozen, np.int32(t), additive=True))
        new = list(task.classes)
        count = np.maximum(sums["count"][new], 1.0)
        prototypes = np.array(jax.device_get(state["prototypes"]), copy=True)
        blocks = [t] if self.config.use_diagonal else list(range(t + 1))
        prototypes[np.ix_(new, blocks)] = sums["sum"][np.ix_(new, blocks)] / count[:, None, None]
        if not self.config.use_diagonal:
            prototypes = complement_prototypes(prototypes, task.task_classes, t,
                                               recalc=self.config.recalc_sim)
        out = dict(state, prototypes=prototypes,
                   count=np.asarray(jax.device_get(state["count"])) + sums["count"])
        if self.config.use_init_ptm:
            ptm = np.array(jax.device_get(state["ptm"]), copy=True)
            ptm[new] = sums["ptm"][new] / count[:, None]
            out["ptm"] = ptm
        return trainable, jax.device_put(out)

    def accumulate(self, carry, batch, adapters, frozen, t):
        """Adds the batch's features in every trained subspace to their classes' sums."""
        phi = self.all_subspaces(adapters, frozen, batch["inputs"], t)              # (T, B, D)
        onehot = jax.nn.one_hot(batch["label"], self.num_classes) * batch["mask"][:, None]
        out = {"sum": carry["sum"] + jnp.einsum("bc,jbd->cjd", onehot, phi, precision=HIGHEST),
               "count": carry["count"] + onehot.sum(0)}
        if "ptm" in carry:
            out["ptm"] = carry["ptm"] + jnp.matmul(onehot.T, frozen_query(self.backbone, frozen,
                                                                          batch),
                                                   precision=HIGHEST)
        return out

    def count_trainable(self, trainable, state):
        """Every task's adapter (the temporary classifier of each task is dropped)."""
        return count_params(trainable["adapters"])
