"""First-session adaptation: tune the pre-trained model on the first task only, then freeze
it for good (RanPAC's phase 1, APER's adaptation step).

On task 0 the backbone is adapted -- wholly (``'full'``: a trainable copy of the backbone)
or through one PEFT module (``'adapter'``, ``'ssf'``, ``'prompt'``, ``'lora'``; see
:mod:`pecft_jax.peft.modules`) -- together with a cosine classifier over the first task's
classes, ``sigma * cos(f, w_c)`` with a learnable scale ``sigma`` that starts at 1 (the
official ``CosineLinear`` of RanPAC and APER: weights ``U(-1/sqrt(D), 1/sqrt(D))``), by
cross-entropy. After the task the classifier is dropped and the adapted model's [CLS]
feature (after the final LayerNorm) is what the method builds on; no later task takes a
gradient step.

Trainable pytree: ``{'peft': module params}`` or ``{'backbone': backbone copy}``, plus
``{'first_head': {'kernel': (D, C), 'sigma': ()}}`` while task 0 trains.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pecft_jax.backbones.backbone import Backbone
from pecft_jax.peft.modules import MODULE_KINDS, init_module, module_context
from pecft_jax.peft.prompt_pool import cosine_similarity

Array = jax.Array
#: what can be adapted on the first task: the whole backbone or one PEFT module
ADAPTATIONS = ("full",) + MODULE_KINDS
HEAD = "first_head"


class FirstSession:
    """The adapted model of a first-session method: its parameters, its feature and the
    first task's loss. ``kind`` is one of :data:`ADAPTATIONS`; ``settings`` the module's
    settings dataclass (``None`` for ``'full'``)."""

    def __init__(self, kind: str, settings: Any, backbone: Backbone):
        if kind not in ADAPTATIONS:
            raise ValueError(f"first-session adaptation must be one of {ADAPTATIONS}, got "
                             f"{kind!r}")
        self.kind, self.settings, self.backbone = kind, settings, backbone

    def init(self, module_rng: Array, head_rng: Array, frozen: Any, num_classes: int) -> dict:
        """The adapted parameters (a fresh module, or a copy of the backbone) and the cosine
        classifier of the first task (over all ``num_classes``; the loss masks the others)."""
        if self.kind == "full":
            trainable = {"backbone": jax.tree_util.tree_map(jnp.array, dict(frozen))}
        else:
            trainable = {"peft": init_module(self.kind, self.settings, self.backbone.config,
                                             module_rng)}
        dim = self.backbone.feature_dim
        bound = 1.0 / np.sqrt(dim)  # the official CosineLinear's reset_parameters
        trainable[HEAD] = {
            "kernel": jax.random.uniform(head_rng, (dim, num_classes), jnp.float32, -bound,
                                         bound),
            "sigma": jnp.ones((), jnp.float32)}
        return trainable

    def features(self, trainable: Mapping, frozen: Any, images: Array, deterministic=True,
                 rng: Optional[Array] = None) -> Array:
        """The adapted model's [CLS] token after the final LayerNorm."""
        if self.kind == "full":
            return self.backbone.apply(trainable["backbone"], images, output="cls",
                                       deterministic=deterministic, dropout_rng=rng)
        context = module_context(self.kind, self.settings, trainable["peft"])
        return self.backbone.apply(frozen, images, context, output="cls",
                                   deterministic=deterministic, dropout_rng=rng)

    def logits(self, trainable: Mapping, features: Array) -> Array:
        """The first task's cosine classifier, ``sigma * cos(f, w_c)``."""
        head = trainable[HEAD]
        return head["sigma"] * cosine_similarity(features, head["kernel"].T)

    def loss(self, method, trainable: Mapping, frozen: Any, batch: Mapping, rng: Array,
             task) -> tuple:
        """Cross-entropy of the cosine classifier over the task's classes (dropout in the
        module on), with the method's masking and training accuracy."""
        f = self.features(trainable, frozen, batch["inputs"], deterministic=False, rng=rng)
        logits = self.logits(trainable, f)
        ce = method.masked_ce(logits, batch, task)
        return ce, {"metrics": {"accuracy": method.train_accuracy(logits, batch, task)}}

    @staticmethod
    def finish(trainable: Mapping) -> dict:
        """The adapted parameters without the first task's classifier (dropped after it)."""
        return {k: v for k, v in trainable.items() if k != HEAD}
