"""SimpleCIL: prototypes of a frozen pre-trained model (Zhou et al., "Revisiting
Class-Incremental Learning with Pre-Trained Models: Generalizability and Adaptivity are All
You Need", IJCV 2024; official code zhoudw-zdw/RevisitingCIL, ``models/simplecil.py``).

Algorithm (no gradient step at all):

* after task ``t``: for each of its classes ``c``, the prototype ``p_c`` is the mean of the
  frozen backbone's feature -- the [CLS] token after the final LayerNorm -- over the class's
  training images without augmentation (the official loader uses test-time transforms);
  prototypes of earlier classes never change (a class met again, as in domain-incremental
  scenarios, gets the running mean over all its images so far);
* prediction: ``argmax_c cos(f(x), p_c)`` over the classes seen so far (the official
  ``CosineLinear``: both sides L2-normalised, its scale ``sigma`` stays 1).

Trainable: nothing. State: per-class feature sums ``(C, D)`` and counts ``(C,)``; the
prototypes are their ratio (zero rows for unseen classes).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pecft_jax.methods.base import Method
from pecft_jax.methods.common import frozen_query
from pecft_jax.peft.prompt_pool import cosine_similarity


def class_feature_sums(carry: dict, features: jax.Array, labels: jax.Array,
                       mask: jax.Array) -> dict:
    """Adds a batch to per-class feature sums ``(C, D)`` and counts ``(C,)`` (padding rows
    have ``mask == 0``). It only adds the batch's terms: ``TaskData.reduce(...,
    additive=True)`` lets each device sum its own shard and adds the devices' sums once."""
    onehot = jax.nn.one_hot(labels, carry["count"].shape[0], dtype=features.dtype)
    onehot = onehot * mask[:, None]
    sums = jnp.matmul(onehot.T, features, precision=jax.lax.Precision.HIGHEST)  # full float32
    return {"sum": carry["sum"] + sums, "count": carry["count"] + onehot.sum(0)}


class SimpleCIL(Method):
    name = "simplecil"
    uses_frozen_query = True

    @dataclasses.dataclass(frozen=True)
    class Config:
        """SimpleCIL has no hyper-parameter of its own."""

    def init(self, rng, frozen):
        dim = self.backbone.feature_dim
        return {}, {"sum": jnp.zeros((self.num_classes, dim), jnp.float32),
                    "count": jnp.zeros((self.num_classes,), jnp.float32)}

    def train_epochs(self, task, default):
        return 0

    def after_task(self, task, trainable, state, frozen, data, rng):
        return trainable, data.reduce(self.accumulate, state, frozen, additive=True)

    def accumulate(self, carry, batch, frozen):
        """Adds the batch's frozen features to their classes' sums and counts."""
        features = frozen_query(self.backbone, frozen, batch)
        return class_feature_sums(carry, features, batch["label"], batch["mask"])

    def logits(self, trainable, state, frozen, batch, task):
        prototypes = state["sum"] / jnp.maximum(state["count"], 1.0)[:, None]
        return cosine_similarity(frozen_query(self.backbone, frozen, batch), prototypes)
