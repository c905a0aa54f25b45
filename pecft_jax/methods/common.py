"""Pieces several methods share (kept once here, not copied per method)."""
from __future__ import annotations

from typing import Callable, Mapping, Tuple

import jax

from pecft_jax.backbones.backbone import Backbone

#: The batch key under which the loop passes precomputed frozen queries (see
#: ``Method.uses_frozen_query``).
FROZEN_QUERY = "frozen_query"
#: The batch key under which the loop passes a method's precomputed fixed features (see
#: ``Method.features_fixed_after``).
FIXED_FEATURES = "fixed_features"
#: The batch key under which the loop passes the learnt tasks' precomputed pass features
#: (see ``Method.task_features_fixed``).
TASK_FEATURES = "task_features"


def num_examples(inputs) -> int:
    """The batch size of a batch's ``inputs`` (an image array or a dict of token arrays)."""
    return jax.tree_util.tree_leaves(inputs)[0].shape[0]


def host_seed(key: jax.Array) -> int:
    """A numpy seed drawn from a JAX key, for the host-side randomness of a method's
    after-task work (k-means, a shuffled pairing or split): the same key, the same seed."""
    return int(jax.random.randint(key, (), 0, 2 ** 31 - 1))


def frozen_query(backbone: Backbone, frozen, batch: Mapping[str, jax.Array]) -> jax.Array:
    """q(x): the frozen, un-prompted pretrained model's [CLS] feature of ``batch['inputs']``,
    without gradient -- or ``batch['frozen_query']`` when the loop precomputed it (fixed,
    un-augmented examples: the test sets, training data without augmentation).

    L2P, DualPrompt and CODA-Prompt match prompt keys against it; HiDe-Prompt and S-Prompts
    infer the task from it; SimpleCIL's prototypes are its class means."""
    if FROZEN_QUERY in batch:
        return jax.lax.stop_gradient(batch[FROZEN_QUERY])
    return jax.lax.stop_gradient(backbone.apply(frozen, batch["inputs"], output="cls"))


def cached_fixed_features(batch: Mapping[str, jax.Array],
                          compute: Callable[[], jax.Array]) -> jax.Array:
    """``batch['fixed_features']`` when the loop precomputed the method's fixed features
    (``Method.features_fixed_after``: the test sets, once the features no longer change),
    else ``compute()``."""
    if FIXED_FEATURES in batch:
        return jax.lax.stop_gradient(batch[FIXED_FEATURES])
    return compute()


def cached_task_features(batch: Mapping[str, jax.Array],
                         compute: Callable[[], jax.Array]) -> jax.Array:
    """``batch['task_features']`` ``(B, num_tasks, W)`` when the loop precomputed the
    learnt tasks' pass features (``Method.task_features_fixed``; the passes after the
    evaluated task are zeros), else ``compute()``, which gives the same layout."""
    if TASK_FEATURES in batch:
        return jax.lax.stop_gradient(batch[TASK_FEATURES])
    return compute()


def prompted_cls_token(backbone: Backbone, frozen, images: jax.Array, context) -> jax.Array:
    """The prompted model's final (normed) [CLS] token: the classifier input of the official
    DualPrompt and CODA-Prompt code (``head_type='token'``). Prefix tuning adds no tokens to
    the sequence, so [CLS] stays at position 0 whatever the backbone's own pooling is."""
    return backbone.apply(frozen, images, context, output="tokens")[:, 0]


def batchwise_vote_groups(config) -> Mapping[str, Tuple[int, str]]:
    """``Method.batch_groups`` of a batch-wise prompt vote (L2P, DualPrompt: ``config``'s
    ``batchwise_prompt`` and ``batchwise_group``), which runs in training and in
    evaluation; none without the vote or with one vote per batch (group 0)."""
    group = (config.batchwise_group, "method.batchwise_group")
    return ({"train.batch_size": group, "eval.batch_size": group}
            if config.batchwise_prompt and group[0] else {})
