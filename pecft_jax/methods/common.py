"""Pieces several methods share (kept once here, not copied per method)."""
from __future__ import annotations

import jax

from pecft_jax.backbones.backbone import Backbone


def frozen_query(backbone: Backbone, frozen, images: jax.Array) -> jax.Array:
    """q(x): the frozen, un-prompted pretrained model's [CLS] feature, without gradient.

    L2P, DualPrompt and CODA-Prompt match prompt keys against it; HiDe-Prompt and S-Prompts
    infer the task from it."""
    return jax.lax.stop_gradient(backbone.apply(frozen, images, output="cls"))


def prompted_cls_token(backbone: Backbone, frozen, images: jax.Array, context) -> jax.Array:
    """The prompted model's final (normed) [CLS] token: the classifier input of the official
    DualPrompt and CODA-Prompt code (``head_type='token'``). Prefix tuning adds no tokens to
    the sequence, so [CLS] stays at position 0 whatever the backbone's own pooling is."""
    return backbone.apply(frozen, images, context, output="tokens")[:, 0]
