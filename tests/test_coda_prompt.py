"""CODA-Prompt: component weights and the weighted prompt against numpy, the key/value split,
Gram-Schmidt orthogonality of new components to old ones, frozen old components (gradients and
bit-identity after training a later task), the orthogonality penalty, an end-to-end run and the
paper configuration's exact trainable-parameter count."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pecft_jax.backbones import vit
from pecft_jax.backbones.backbone import Backbone
from pecft_jax.methods import create_method
from pecft_jax.methods.coda_prompt import (COMPONENT_FIELDS, as_prefix, assemble_prompt,
                                           classical_gram_schmidt_extend,
                                           component_weights, gram_schmidt_extend)
from pecft_jax.methods.common import frozen_query
from pecft_jax.peft.prompt_pool import l2_normalize
from pecft_jax.train.checkpoint import Checkpointer
from pecft_jax.methods.base import count_params
from pecft_jax.train.loop import train_and_evaluate

from helpers import load_experiment_config, task_spec, tiny_config

CFG = vit.get_config("ViT-Micro/4", num_classes=0)  # two blocks, width 32
BACKBONE = Backbone(CFG)
NUM_TASKS, NUM_CLASSES = 3, 6
TASK_CLASSES = ((0, 1), (2, 3), (4, 5))


def spec(t):
    return task_spec(t, TASK_CLASSES, NUM_CLASSES)


def make_method(**options):
    values = dict(name="coda_prompt", pool_size=6, prompt_length=4, layers=(0, 1))
    values.update(options)
    return create_method("coda_prompt", ml_collections.ConfigDict(values), BACKBONE,
                         NUM_CLASSES, NUM_TASKS)


def load_config(name, arg):
    return load_experiment_config(name, arg)


def random_params(cfg, seed):
    """Backbone params with random values (shapes from eval_shape: nothing compiles)."""
    shapes = jax.eval_shape(lambda key: vit.init_params(cfg, key), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: ((1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0)
                         + 0.2 * rng.normal(size=s.shape)).astype(np.float32), shapes)


def np_normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def perturb(trainable, task, seed):
    """Give task `task`'s slice arbitrary (non-orthogonal) values, as training would."""
    rng = np.random.default_rng(seed)
    comps = dict(trainable["components"])
    comps[str(task)] = jax.tree_util.tree_map(
        lambda x: jnp.asarray(np.asarray(x) + 0.3 * rng.normal(size=x.shape), jnp.float32),
        comps[str(task)])
    return dict(trainable, components=comps)


def test_weights_and_assembled_prompt_match_numpy():
    rng = np.random.default_rng(0)
    q, keys, attention = (rng.normal(size=s).astype(np.float32)
                          for s in ((5, 16), (7, 16), (7, 16)))
    prompts = rng.normal(size=(7, 6, 16)).astype(np.float32)
    alpha = np.asarray(component_weights(jnp.asarray(q), jnp.asarray(keys),
                                         jnp.asarray(attention)))
    expected = np.einsum("bmd,md->bm", np_normalize(q[:, None, :] * attention[None]),
                         np_normalize(keys))
    np.testing.assert_allclose(alpha, expected, rtol=1e-5, atol=1e-6)
    prompt = np.asarray(assemble_prompt(jnp.asarray(alpha), jnp.asarray(prompts)))
    manual = sum(alpha[:, m, None, None] * prompts[m][None] for m in range(7))
    np.testing.assert_allclose(prompt, manual, rtol=1e-5, atol=1e-5)
    prefix = np.asarray(as_prefix(jnp.asarray(prompt)))
    assert prefix.shape == (5, 2, 3, 16)
    np.testing.assert_array_equal(prefix[:, 0], prompt[:, :3])  # first half: prefix keys
    np.testing.assert_array_equal(prefix[:, 1], prompt[:, 3:])  # second half: prefix values


def test_weights_without_the_bmd_tensor_match_normalise_then_dot_with_gradients():
    """component_weights avoids materialising q ⊙ A_m; its values and gradients must equal
    the direct formula's, also for all-zero rows (the slices of tasks not yet begun)."""
    rng = np.random.default_rng(3)
    q, keys, attention = (jnp.asarray(rng.normal(size=s), jnp.float32)
                          for s in ((6, 12), (9, 12), (9, 12)))
    keys, attention = keys.at[7].set(0.0), attention.at[8].set(0.0)
    cotangent = jnp.asarray(rng.normal(size=(6, 9)), jnp.float32)

    def direct(q, keys, attention):
        return jnp.einsum("bmd,md->bm", l2_normalize(q[:, None, :] * attention[None]),
                          l2_normalize(keys))

    ours, theirs = component_weights(q, keys, attention), direct(q, keys, attention)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(ours)[:, 7:] == 0.0)
    grads = [jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a) * cotangent), argnums=(0, 1, 2))(
        q, keys, attention) for fn in (component_weights, direct)]
    for ours_grad, their_grad in zip(*grads):
        assert np.all(np.isfinite(ours_grad))
        np.testing.assert_allclose(ours_grad, their_grad, rtol=1e-4, atol=1e-4)


def test_gram_schmidt_new_rows_are_orthonormal_and_orthogonal_to_old():
    old = np.random.default_rng(1).normal(size=(5, 3, 4)).astype(np.float32)  # not orthogonal
    new = gram_schmidt_extend(old, 4, np.random.default_rng(0))
    assert new.shape == (4, 3, 4) and new.dtype == np.float32
    flat_old, flat_new = old.reshape(5, -1), new.reshape(4, -1)
    np.testing.assert_allclose(flat_new @ flat_new.T, np.eye(4), atol=1e-6)
    np.testing.assert_allclose(flat_old @ flat_new.T, 0.0, atol=1e-5)
    first = gram_schmidt_extend(np.zeros((0, 8), np.float32), 3, np.random.default_rng(0))
    np.testing.assert_allclose(first @ first.T, np.eye(3), atol=1e-6)
    with pytest.raises(ValueError, match="cannot make 13 components of size 12"):
        gram_schmidt_extend(old, 8, np.random.default_rng(0))


def official_gram_schmidt(old, draws):
    """zoo.py's gram_schmidt (lines 104-122) on rows: each draw minus its projection onto
    every earlier column (old as given, new ones unnormalised), then every new one
    normalised; written from the official loop, in float64."""
    uu = [np.asarray(u, np.float64) for u in old]
    start = len(uu)
    for vk in draws:
        uk = 0
        for uj in uu:
            uk = uk + (vk * uj).sum() / (uj * uj).sum() * uj
        uu.append(vk - uk)
    return np.stack([u / np.linalg.norm(u) for u in uu[start:]])


def test_official_gram_schmidt_is_the_official_loop_and_exact_only_on_orthogonal_rows():
    rng = np.random.default_rng(1)
    drifted = rng.normal(size=(5, 12))  # trained components: no longer orthogonal
    draws = np.random.default_rng(0).standard_normal((4, 12))
    got = classical_gram_schmidt_extend(drifted.reshape(5, 3, 4), 4, np.random.default_rng(0))
    assert got.shape == (4, 3, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got.reshape(4, 12), official_gram_schmidt(drifted, draws),
                               atol=1e-6)
    # the official result is not orthogonal to drifted components; the exact one is
    assert np.abs(drifted @ got.reshape(4, 12).T).max() > 1e-2
    # on orthonormal earlier rows both are the same projection of the same draws
    orthonormal = np.linalg.qr(rng.normal(size=(12, 5)))[0].T
    exact = gram_schmidt_extend(orthonormal, 4, np.random.default_rng(0))
    official = classical_gram_schmidt_extend(orthonormal, 4, np.random.default_rng(0))
    np.testing.assert_allclose(official, exact, atol=1e-6)
    with pytest.raises(ValueError, match="an earlier component is zero"):
        classical_gram_schmidt_extend(np.zeros((2, 12)), 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="orthogonalize='qr' must be one of"):
        make_method(orthogonalize="qr")


def test_before_task_initialises_each_slice_orthogonal_to_earlier_ones():
    method = make_method()
    trainable, state = method.init(jax.random.key(0), None)
    trainable, _ = method.before_task(spec(0), trainable, state, None, None, jax.random.key(1))
    trainable = perturb(trainable, 0, seed=2)  # "trained": no longer orthonormal
    after, _ = method.before_task(spec(1), trainable, state, None, None, jax.random.key(3))
    for layer in ("0", "1"):
        for field in COMPONENT_FIELDS:
            old = np.asarray(after["components"]["0"][layer][field]).reshape(2, -1)
            new = np.asarray(after["components"]["1"][layer][field]).reshape(2, -1)
            np.testing.assert_array_equal(old, np.asarray(
                trainable["components"]["0"][layer][field]).reshape(2, -1))
            np.testing.assert_allclose(new @ new.T, np.eye(2), atol=1e-5)
            np.testing.assert_allclose(old @ new.T, 0.0, atol=1e-5)
            assert not np.any(np.asarray(after["components"]["2"][layer][field]))  # not yet


@pytest.fixture(scope="module")
def trained_task1():
    """A method at task 1 with a 'trained' task-0 slice, and a batch."""
    method = make_method()
    frozen = random_params(CFG, 0)
    trainable, state = method.init(jax.random.key(0), frozen)
    trainable, _ = method.before_task(spec(0), trainable, state, frozen, None, jax.random.key(1))
    trainable = perturb(trainable, 0, seed=4)
    trainable, _ = method.before_task(spec(1), trainable, state, frozen, None, jax.random.key(2))
    images = jax.random.normal(jax.random.key(3), (8, 16, 16, 1))
    return method, frozen, trainable, state, images


def test_prefix_context_is_the_weighted_component_sum(trained_task1):
    method, frozen, trainable, _, images = trained_task1
    q = frozen_query(BACKBONE, frozen, {"inputs": images})
    components = method.components(trainable, 1, train=False)
    # every task's slice, fixed size (one compiled step); tasks 0 and 1 (2 + 2) active
    assert components["0"]["prompts"].shape == (6, 4, 32)
    assert np.asarray(components["0"]["active"]).tolist() == [True] * 4 + [False] * 2
    ctx = method.context(components, q)
    assert sorted(ctx.layers) == [0, 1]
    q = np.asarray(q, np.float64)
    for layer in ("0", "1"):
        c = {f: np.concatenate([np.asarray(trainable["components"][t][layer][f], np.float64)
                                for t in ("0", "1")]) for f in COMPONENT_FIELDS}
        alpha = np.einsum("bmd,md->bm", np_normalize(q[:, None] * c["attention"][None]),
                          np_normalize(c["keys"]))
        prompt = np.einsum("bm,mld->bld", alpha, c["prompts"])
        np.testing.assert_allclose(ctx.layers[int(layer)].prefix_key, prompt[:, :2],
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ctx.layers[int(layer)].prefix_value, prompt[:, 2:],
                                   rtol=1e-4, atol=1e-5)


def test_only_the_current_slice_and_head_learn(trained_task1):
    method, frozen, trainable, state, images = trained_task1
    batch = {"inputs": images, "label": jnp.array([2, 3] * 4)}
    ortho_method = make_method(ortho_mu=0.5)
    (loss, aux), grads = jax.jit(jax.value_and_grad(
        lambda tr: ortho_method.loss(tr, state, frozen, batch, jax.random.key(0), spec(1)),
        has_aux=True))(trainable)
    for layer in ("0", "1"):
        for field in COMPONENT_FIELDS:
            assert not np.any(np.asarray(grads["components"]["0"][layer][field]))  # frozen
            assert np.abs(np.asarray(grads["components"]["1"][layer][field])).sum() > 0
            assert not np.any(np.asarray(grads["components"]["2"][layer][field]))  # unused
    bias = np.asarray(grads["head"]["bias"])
    assert np.all(bias[[0, 1, 4, 5]] == 0.0) and np.all(np.abs(bias[[2, 3]]) > 0)
    # with the task index traced (as the loop runs it) the gradients are the same
    traced = jax.jit(jax.grad(lambda tr, task: ortho_method.loss(
        tr, state, frozen, batch, jax.random.key(0), task)[0]))(trainable, spec(1))
    for got, want in zip(jax.tree_util.tree_leaves(traced), jax.tree_util.tree_leaves(grads)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # and the update mask lets only slice 1 and the head move
    mask = jax.jit(method.update_mask)(trainable, spec(1))
    for t, value in (("0", 0.0), ("1", 1.0), ("2", 0.0)):
        assert set(np.asarray(jax.tree_util.tree_leaves(mask["components"][t])).tolist()) \
            == {value}
    assert set(np.asarray(jax.tree_util.tree_leaves(mask["head"])).tolist()) == {1.0}
    # the orthogonality penalty: mean((B B^T - I)^2) of tasks 0..1's K, A and flattened P
    expected = 0.0
    for layer in ("0", "1"):
        for field in COMPONENT_FIELDS:
            b = np.concatenate([np.asarray(trainable["components"][t][layer][field], np.float64)
                                .reshape(2, -1) for t in ("0", "1")])
            expected += np.mean((b @ b.T - np.eye(4)) ** 2)
    np.testing.assert_allclose(aux["metrics"]["ortho"], expected, rtol=1e-4)
    np.testing.assert_allclose(loss, aux["metrics"]["ce"] + 0.5 * expected, rtol=1e-5)


def test_end_to_end_old_components_stay_bit_identical(tmp_path):
    config = tiny_config("coda_prompt", pool_size=6, prompt_length=4, layers=(0, 1))
    config.scenario.num_tasks = 2
    config.train.checkpoint_every_steps = 0  # task-end checkpoints only (read below)
    results = train_and_evaluate(config, str(tmp_path))
    assert [len(r) for r in results["accuracy_matrix"]] == [1, 2]
    # one compiled train and eval step for both tasks (the task index is an input)
    assert results["compilation"]["traces"] == {"train_step": 1, "eval_step": 1}
    d = 32
    assert results["trainable_params"] == 2 * 6 * (4 * d + d + d) + d * 10 + 10
    ckpt = Checkpointer(str(tmp_path))
    after0 = ckpt.restore("tasks", 0)["trainable"]["components"]
    after1 = ckpt.restore("tasks", 1)["trainable"]["components"]
    ckpt.close()
    for layer in ("0", "1"):
        for field in COMPONENT_FIELDS:
            np.testing.assert_array_equal(after1["0"][layer][field], after0["0"][layer][field])
            assert not np.any(after0["1"][layer][field])  # task 1's slice did not exist yet
            trained = np.asarray(after1["1"][layer][field]).reshape(3, -1)
            assert np.any(trained)
    # task 0's slice learned: it is no longer the unit-norm Gram-Schmidt initialisation
    keys0 = np.asarray(after0["0"]["0"]["keys"])
    assert not np.allclose(np.linalg.norm(keys0, axis=1), 1.0, atol=1e-4)


@pytest.mark.parametrize("benchmark,classes,expected", [("cifar100", 100, 3_916_900),
                                                        ("imagenet_r", 200, 3_993_800)])
def test_paper_configuration_trainable_parameters(benchmark, classes, expected):
    config = load_config("coda_prompt", benchmark)
    backbone = Backbone(vit.get_config("ViT-B/16", num_classes=0))
    method = create_method("coda_prompt", config.method, backbone, classes,
                           config.scenario.num_tasks)
    shapes = jax.eval_shape(lambda key: method.init(key, None)[0], jax.random.key(0))
    d, m, length, layers = 768, 100, 8, 5
    formula = layers * (m * length * d + m * d + m * d) + d * classes + classes  # P, K, A + head
    assert formula == expected
    assert count_params(shapes) == expected


def test_bad_configuration_fails_clearly():
    with pytest.raises(ValueError, match="multiple of the number of tasks"):
        make_method(pool_size=7)
    with pytest.raises(ValueError, match="even number"):
        make_method(prompt_length=5)
    with pytest.raises(ValueError, match="exceeds the feature width 32"):
        make_method(pool_size=36)
    with pytest.raises(ValueError, match="layers \\[4\\] do not exist"):
        make_method(layers=(0, 4))
