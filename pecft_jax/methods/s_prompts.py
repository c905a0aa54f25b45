"""S-Prompts: one prompt set and one classifier per domain, picked at test time by the
nearest domain centroid (Wang et al., NeurIPS 2022; official code iamwangyabin/S-Prompts).

This is the paper's image-only variant for a ViT, **S-iPrompts** (``SiNet`` in the official
code); S-liPrompts additionally learns CLIP text prompts as its classifier and needs a
CLIP text encoder, which this library does not have. For domain-incremental learning
(every task = a new domain with the same classes). Official defaults in brackets:

* per domain ``s``: prompt tokens ``P_s`` [10 tokens, PyTorch ``Linear`` init
  ``U(-1/sqrt(D), 1/sqrt(D))``] put after [CLS] at the input (after the position
  embedding), and a linear classifier ``W_s`` over the classes on the [CLS] output;
* training domain ``s`` touches only ``P_s`` and ``W_s``: cross-entropy, SGD momentum 0.9
  [lr 0.01, cosine stepped per epoch over 30 epochs, batch 128], weight decay [5e-4 on the
  first domain, 2e-4 later] added to the gradient as PyTorch's ``SGD(weight_decay=...)``
  does;
* after domain ``s``: k-means [k = 5] on the L2-normalised frozen (un-prompted) [CLS]
  features of its training images [one pass through the training augmentation]; the
  centroids are the domain's keys;
* test: the frozen feature's distance to every stored centroid [the official code sums
  absolute differences, i.e. an L1 distance]; the domain of the nearest centroid picks the
  prompt and the classifier. ``logits`` returns ``task_pred`` = the predicted domain.

Earlier domains' prompts and classifiers never change: every domain's prompt and classifier
is in the one compiled train step (the domain index is traced), and ``update_mask`` lets only
the current domain's learn. (The official code hands every domain's parameters to each
domain's SGD, so under the PyTorch it pins (1.11) weight decay keeps shrinking the earlier
domains' prompts and heads; that is an artefact of the code, not the method, and is not
reproduced.)
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pecft_jax.methods import statistics as stats_lib
from pecft_jax.methods.base import Method, TaskSpec, init_linear_head, mask_current_task
from pecft_jax.methods.common import frozen_query, host_seed
from pecft_jax.backbones.context import LayerPEFT, PEFTContext
from pecft_jax.peft.prompt_pool import l2_normalize
from pecft_jax.peft.per_task import init_per_task

Array = jax.Array


class SPrompts(Method):
    name = "s_prompts"
    # every domain has every class; the per-domain classifier covers them all
    train_class_mask = "task"
    uses_frozen_query = True
    infers_task = True

    @dataclasses.dataclass(frozen=True)
    class Config:
        prompt_length: int = 10
        num_centroids: int = 5            # k of the k-means keys per domain
        distance: str = "l1"
        normalize_features: bool = True   # k-means on L2-normalised frozen features
        kmeans_n_init: int = 10
        # k-means on one pass of the domain's training data through the training augmentation,
        # as the official code clusters its augmented training loader (sprompt.py: clustering(
        # self.train_loader)); False: on the un-augmented images
        kmeans_on_augmented: bool = True
        first_weight_decay: float = 5e-4  # SGD weight decay on the first domain ...
        weight_decay: float = 2e-4        # ... and on the later ones

        def __post_init__(self):
            if self.prompt_length <= 0:
                raise ValueError(f"s_prompts prompt_length must be positive, got "
                                 f"{self.prompt_length}")
            if self.num_centroids <= 0:
                raise ValueError(f"s_prompts num_centroids must be positive, got "
                                 f"{self.num_centroids}")
            if self.distance not in stats_lib.METRICS:
                raise ValueError(f"s_prompts distance must be one of {stats_lib.METRICS}, got "
                                 f"{self.distance!r}")

    # ------------------------------------------------------------------ set-up
    def init(self, rng, frozen):
        dim = self.backbone.feature_dim
        bound = 1.0 / np.sqrt(dim)  # nn.Linear(D, L, bias=False).weight, the official prompt

        def one_domain(key):
            k_prompt, k_head = jax.random.split(key)
            return (jax.random.uniform(k_prompt, (self.config.prompt_length, dim), jnp.float32,
                                       -bound, bound),
                    init_linear_head(k_head, dim, self.num_classes))
        domains = init_per_task(one_domain, rng, self.num_tasks)
        prompts = {s: prompt for s, (prompt, _) in domains.items()}
        heads = {s: head for s, (_, head) in domains.items()}
        k = self.config.num_centroids
        state = {"centroids": jnp.zeros((self.num_tasks, k, dim), jnp.float32),
                 "centroid_valid": jnp.zeros((self.num_tasks, k), bool)}
        return {"prompts": prompts, "heads": heads}, state

    def update_mask(self, trainable, task):
        """Domain s's prompt and classifier learn while domain s trains, no other's."""
        return {part: mask_current_task(trainable[part], task.index)
                for part in ("prompts", "heads")}

    def _stacked(self, trainable) -> Tuple[Array, Array, Array]:
        """Every domain's prompt ``(T, L, D)``, classifier kernel ``(T, D, C)`` and bias
        ``(T, C)``, in domain order."""
        order = [str(s) for s in range(self.num_tasks)]
        return (jnp.stack([trainable["prompts"][s] for s in order]),
                jnp.stack([trainable["heads"][s]["kernel"] for s in order]),
                jnp.stack([trainable["heads"][s]["bias"] for s in order]))

    # ------------------------------------------------------------------ forward
    def _features(self, frozen, images, prompts: Array) -> Array:
        context = PEFTContext({0: LayerPEFT(prompt=prompts)})
        return self.backbone.apply(frozen, images, context, output="cls")

    def loss(self, trainable, state, frozen, batch, rng, task: TaskSpec):
        prompts, kernels, biases = self._stacked(trainable)
        own = [prompts[task.index], kernels[task.index], biases[task.index]]  # traced index
        features = self._features(frozen, batch["inputs"], own[0])
        logits = features @ own[1] + own[2]
        ce = self.masked_ce(logits, batch, task)
        # torch SGD's weight decay (g += wd * p) on the parameters being trained
        c = self.config
        wd = jnp.where(task.index == 0, c.first_weight_decay, c.weight_decay)
        decay = 0.5 * wd * sum(jnp.sum(jnp.square(p)) for p in own)
        accuracy = self.train_accuracy(logits, batch, task)
        return ce + decay, {"metrics": {"ce": ce, "accuracy": accuracy}}

    def _query(self, frozen, batch) -> Array:
        q = frozen_query(self.backbone, frozen, batch)
        return l2_normalize(q) if self.config.normalize_features else q

    def query_pass(self, batch, frozen) -> Array:
        """The k-means input of a batch of the domain's training data (a TaskData pass)."""
        return self._query(frozen, batch)

    def predict_domain(self, state, frozen, batch, task: TaskSpec) -> Array:
        """The domain whose nearest centroid is closest to the frozen feature (domains
        ``0..task.index`` only)."""
        d = stats_lib.centroid_distances(self._query(frozen, batch), state["centroids"],
                                         self.config.distance)  # (B, T, K)
        seen = (jnp.arange(self.num_tasks) <= task.index)[:, None] & state["centroid_valid"]
        d = jnp.where(seen[None], d, jnp.inf).min(axis=-1)
        return jnp.argmin(d, axis=-1)

    def logits(self, trainable, state, frozen, batch, task):
        domain = self.predict_domain(state, frozen, batch, task)
        prompts, kernels, biases = self._stacked(trainable)
        features = self._features(frozen, batch["inputs"], prompts[domain])  # (B, L, D) prompts
        every = jnp.einsum("bd,tdc->btc", features, kernels) + biases[None]
        logits = jnp.take_along_axis(every, domain[:, None, None], axis=1)[:, 0]
        return logits, domain

    # --------------------------------------------------------------- after task
    def after_task(self, task, trainable, state, frozen, data, rng):
        source = data.augmented() if self.config.kmeans_on_augmented else data
        features, _ = source.map(self.query_pass, frozen)
        k = min(self.config.num_centroids, features.shape[0])
        seed = host_seed(rng)
        centers, _, _ = stats_lib.kmeans(features, k, seed=seed, n_init=self.config.kmeans_n_init)
        centroids = np.array(state["centroids"])
        valid = np.array(state["centroid_valid"])
        centroids[task.index] = 0.0
        valid[task.index] = False
        centroids[task.index, :k] = centers
        valid[task.index, :k] = True
        return trainable, dict(state, **jax.device_put(  # device_put compiles nothing
            {"centroids": centroids, "centroid_valid": valid}))
