"""L2P's options of the official 5-datasets config: the task prompt mask (training on task t
uses pool entries tN..(t+1)N-1 for every example and pulls their keys; test still picks by
similarity) and the shared prompt pool (those entries start as a copy of task t-1's)."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pecft_jax.backbones import vit
from pecft_jax.backbones.backbone import Backbone
from pecft_jax.methods import create_method
from pecft_jax.methods.common import frozen_query

from helpers import task_spec

CFG = vit.get_config("ViT-Micro/4", num_classes=0)
BACKBONE = Backbone(CFG)
TASK_CLASSES = ((0, 1), (2, 3), (4, 5), (6, 7))
POOL, TOP_K = 6, 2  # room for the masks of tasks 0-2; task 3's does not fit


def make_method(**options):
    config = ml_collections.ConfigDict(dict(name="l2p", pool_size=POOL, prompt_length=2,
                                            top_k=TOP_K, pull_constraint=0.5, **options))
    return create_method("l2p", config, BACKBONE, 8, len(TASK_CLASSES))


def _setup(**options):
    shapes = jax.eval_shape(lambda key: vit.init_params(CFG, key), jax.random.key(0))
    rng = np.random.default_rng(0)
    frozen = jax.tree_util.tree_map(
        lambda s: (0.2 * rng.normal(size=s.shape)).astype(np.float32), shapes)
    method = make_method(**options)
    trainable, state = method.init(jax.random.key(1), frozen)
    batch = {"inputs": jax.random.normal(jax.random.key(2), (8, 16, 16, 1)),
             "label": jnp.array([0, 1] * 4)}
    return method, frozen, trainable, state, batch


def test_the_task_prompt_mask_trains_and_pulls_the_tasks_own_entries():
    method, frozen, trainable, state, batch = _setup(use_prompt_mask=True)
    q = np.asarray(frozen_query(BACKBONE, frozen, batch), np.float64)
    keys = np.asarray(trainable["keys"], np.float64)
    cosine = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ \
        (keys / np.linalg.norm(keys, axis=1, keepdims=True)).T
    similar = np.sort(np.argsort(-cosine, axis=1)[:, :TOP_K], axis=1)

    # the task index is traced, as in the loop's one compiled step for every task
    @jax.jit
    def loss_and_grads(trainable, index):
        spec = dataclasses.replace(task_spec(0, TASK_CLASSES, 8), index=index)
        labels = jnp.asarray(TASK_CLASSES)[index][jnp.arange(8) % 2]
        return jax.value_and_grad(
            lambda tr: method.loss(tr, state, frozen, dict(batch, label=labels),
                                   jax.random.key(3), spec), has_aux=True)(trainable)

    for t in range(len(TASK_CLASSES)):
        (_, aux), grads = loss_and_grads(trainable, jnp.int32(t))
        own = list(range(t * TOP_K, (t + 1) * TOP_K))
        if (t + 1) * TOP_K <= POOL:
            used = [own] * 8
            np.testing.assert_allclose(aux["metrics"]["key_matching"],
                                       np.mean(np.sum(1.0 - cosine[:, own], axis=1)), rtol=1e-5)
        else:  # task 3's entries are past the pool: the similarity choice, as officially
            used = similar.tolist()
        counts = np.bincount(np.ravel(used), minlength=POOL)
        np.testing.assert_array_equal(aux["state"]["task_counts"], counts)
        prompt_grad = np.abs(np.asarray(grads["prompts"])).sum(axis=(1, 2))
        assert np.all((prompt_grad > 0) == (counts > 0)), (t, prompt_grad)
        key_grad = np.abs(np.asarray(grads["keys"])).sum(axis=1)
        assert np.all((key_grad > 0) == (counts > 0)), (t, key_grad)

    # evaluation still picks by similarity
    _, _, idx = jax.jit(lambda tr: method._forward(tr, state, frozen, batch, train=False))(
        trainable)
    np.testing.assert_array_equal(np.sort(np.asarray(idx), axis=1), similar)


def test_the_shared_pool_copies_the_previous_tasks_entries():
    method, frozen, trainable, state, _ = _setup(shared_prompt_pool=True)
    old = np.asarray(trainable["prompts"])
    moved, _ = method.before_task(task_spec(1, TASK_CLASSES, 8), trainable, state, frozen,
                                  None, jax.random.key(0))
    new = np.asarray(moved["prompts"])
    np.testing.assert_array_equal(new[2:4], old[0:2])
    np.testing.assert_array_equal(new[[0, 1, 4, 5]], old[[0, 1, 4, 5]])
    np.testing.assert_array_equal(moved["keys"], trainable["keys"])  # keys keep their own
    first, _ = method.before_task(task_spec(0, TASK_CLASSES, 8), trainable, state, frozen,
                                  None, jax.random.key(0))
    last, _ = method.before_task(task_spec(3, TASK_CLASSES, 8), trainable, state, frozen,
                                 None, jax.random.key(0))  # (3 + 1) * 2 > 6: nothing to copy to
    for unchanged in (first, last):
        np.testing.assert_array_equal(unchanged["prompts"], old)
    off, _ = make_method().before_task(task_spec(1, TASK_CLASSES, 8), trainable, state,
                                       frozen, None, jax.random.key(0))
    np.testing.assert_array_equal(off["prompts"], old)
