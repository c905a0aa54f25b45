"""APER (ADAM): adapt the pre-trained model on the first task, then classify by prototypes
of the pre-trained and the adapted model's features together (Zhou et al., "Revisiting
Class-Incremental Learning with Pre-Trained Models: Generalizability and Adaptivity are All
You Need", IJCV 2024; official code zhoudw-zdw/RevisitingCIL, ``models/aper_*.py``).

Algorithm:

* **task 0**: the backbone is adapted with one of the paper's five variants -- ``finetune``
  (every backbone parameter), ``vpt_shallow`` / ``vpt_deep`` (prompt tokens, zero-initialised
  in the official code), ``ssf`` (scale and shift, ``N(1, 0.02)`` / ``N(0, 0.02)``) or
  ``adapter`` (AdaptFormer: a parallel bottleneck of 64 in every block, scale 0.1, dropout
  0.1) -- with a cosine classifier ``sigma * cos(f, w)`` (learnable ``sigma``) over the
  first task's classes, by cross-entropy (:class:`~pecft_jax.methods.first_session.FirstSession`);
  then it is frozen for good and that classifier dropped;
* **every task** (task 0 included): the prototype of each new class is the mean, over its
  un-augmented training images, of ``[f_pre(x), f_adapted(x)]`` -- the pre-trained model's
  [CLS] feature (after the final LayerNorm) concatenated with the adapted model's, in that
  order, ``2D`` wide, neither half normalised; earlier prototypes never change;
* **prediction**: ``argmax_c cos([f_pre(x), f_adapted(x)], p_c)`` over the seen classes (the
  official ``CosineLinear``, whose ``sigma`` stays 1).

Trainable: the adapted part (module, or the backbone copy for ``finetune``); its first-task
classifier only while task 0 trains. State: per-class sums ``(C, 2D)`` and counts ``(C,)``
of the concatenated feature (prototypes = their ratio).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pecft_jax import peft
from pecft_jax.methods.base import Method, config_field
from pecft_jax.methods.common import cached_fixed_features, frozen_query
from pecft_jax.methods.first_session import FirstSession
from pecft_jax.methods.simplecil import class_feature_sums
from pecft_jax.peft.prompt_pool import cosine_similarity

# variant -> (what FirstSession adapts, the Config field holding its settings)
VARIANTS = {"finetune": ("full", None), "vpt_shallow": ("prompt", "vpt_shallow"),
            "vpt_deep": ("prompt", "vpt_deep"), "ssf": ("ssf", "ssf"),
            "adapter": ("adapter", "adapter")}


class APER(Method):
    name = "aper"
    uses_frozen_query = True  # the pre-trained half of the feature
    features_fixed_after = 0  # the adapted half: frozen once task 0 ends

    @dataclasses.dataclass(frozen=True)
    class Config:
        # the paper's best; 'finetune' | 'vpt_shallow' | 'vpt_deep' | 'ssf'
        variant: str = "adapter"
        # official vision_transformer_adapter.py: ffn_num 64, scalar 0.1, dropout 0.1, 'lora'
        # init (down U(+-1/sqrt(D)), up and biases 0), parallel to the MLP, every block
        adapter: peft.AdapterConfig = config_field(
            lambda: peft.AdapterConfig(bottleneck_dim=64, mode="parallel", scale=0.1,
                                       dropout=0.1))
        # official vision_transformer_ssf.py: N(1, 0.02) / N(0, 0.02) after every block's
        # eight points, the patch embedding and the final norm
        ssf: peft.SSFConfig = config_field(
            lambda: peft.SSFConfig(init="paper", model_points=("embed", "final")))
        # official vpt.py: prompt_token_num 5, zeros; deep = fresh tokens before every block
        # whose outputs are dropped after it ('replace')
        vpt_shallow: peft.PromptConfig = config_field(
            lambda: peft.PromptConfig(length=5, deep=False, init="zeros"))
        vpt_deep: peft.PromptConfig = config_field(
            lambda: peft.PromptConfig(length=5, deep=True, mode="replace", init="zeros"))

        def __post_init__(self):
            if self.variant not in VARIANTS:
                raise ValueError(f"aper variant must be one of {tuple(VARIANTS)}, got "
                                 f"{self.variant!r}")
            if self.vpt_shallow.deep or not self.vpt_deep.deep:
                raise ValueError("aper vpt_shallow must have deep=False and vpt_deep deep=True")

    def __init__(self, config, backbone, num_classes, num_tasks):
        super().__init__(config, backbone, num_classes, num_tasks)
        kind, field = VARIANTS[self.config.variant]
        self.adapted = FirstSession(kind, getattr(self.config, field) if field else None,
                                    backbone)

    def init(self, rng, frozen):
        k_module, k_head = jax.random.split(rng)
        width = 2 * self.backbone.feature_dim
        return (self.adapted.init(k_module, k_head, frozen, self.num_classes),
                {"sum": jnp.zeros((self.num_classes, width), jnp.float32),
                 "count": jnp.zeros((self.num_classes,), jnp.float32)})

    def train_epochs(self, task, default):
        return default if task.index == 0 else 0  # adaptation on the first task only

    def loss(self, trainable, state, frozen, batch, rng, task):
        return self.adapted.loss(self, trainable, frozen, batch, rng, task)

    def features(self, trainable, frozen, batch):
        """``[f_pre(x), f_adapted(x)]``: the pre-trained and the adapted [CLS] features."""
        adapted = cached_fixed_features(
            batch, lambda: self.fixed_features(trainable, frozen, batch["inputs"]))
        return jnp.concatenate([frozen_query(self.backbone, frozen, batch), adapted], -1)

    def fixed_features(self, trainable, frozen, inputs):
        """The adapted model's [CLS] feature, fixed after task 0."""
        return self.adapted.features(trainable, frozen, inputs)

    def after_task(self, task, trainable, state, frozen, data, rng):
        trainable = FirstSession.finish(trainable)  # frozen from here on
        return trainable, data.reduce(self.accumulate, state, trainable, frozen, additive=True)

    def accumulate(self, carry, batch, trainable, frozen):
        """Adds the batch's concatenated features to their classes' sums and counts."""
        return class_feature_sums(carry, self.features(trainable, frozen, batch),
                                  batch["label"], batch["mask"])

    def logits(self, trainable, state, frozen, batch, task):
        prototypes = state["sum"] / jnp.maximum(state["count"], 1.0)[:, None]
        return cosine_similarity(self.features(trainable, frozen, batch), prototypes)
