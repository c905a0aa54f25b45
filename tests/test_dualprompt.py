"""DualPrompt: prefix shapes and placement, G-prompt sharing, key matching and top-1 task
selection against numpy, gradient routing, the E-prompt hand-over between tasks, an end-to-end
run, and the paper configuration's exact trainable-parameter count."""

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pecft_jax.backbones import vit
from pecft_jax.backbones.backbone import Backbone
from pecft_jax.methods import create_method
from pecft_jax.methods.common import frozen_query
from pecft_jax.train.checkpoint import Checkpointer
from pecft_jax.methods.base import count_params
from pecft_jax.train.loop import check_batch_groups, train_and_evaluate

from helpers import load_experiment_config, task_spec, tiny_config

CFG5 = vit.get_config("ViT-Micro/4", num_layers=5, num_classes=0)  # room for G 0-1, E 2-4
BACKBONE = Backbone(CFG5)
NUM_TASKS, NUM_CLASSES = 3, 6
TASK_CLASSES = ((0, 1), (2, 3), (4, 5))


def spec(t):
    return task_spec(t, TASK_CLASSES, NUM_CLASSES)


def make_method(**options):
    config = ml_collections.ConfigDict(dict(name="dualprompt", g_prompt_length=3,
                                            e_prompt_length=2, **options))
    return create_method("dualprompt", config, BACKBONE, NUM_CLASSES, NUM_TASKS)


def load_config(name, arg):
    return load_experiment_config(name, arg)


def np_cosine(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a / np.linalg.norm(a, axis=1, keepdims=True)) @ \
        (b / np.linalg.norm(b, axis=1, keepdims=True)).T


def random_params(cfg, seed):
    """Backbone params with random values (shapes from eval_shape: nothing compiles)."""
    shapes = jax.eval_shape(lambda key: vit.init_params(cfg, key), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: ((1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0)
                         + 0.2 * rng.normal(size=s.shape)).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def setup():
    frozen = random_params(CFG5, 0)
    method = make_method()
    trainable, state = method.init(jax.random.key(1), frozen)
    images = jax.random.normal(jax.random.key(2), (8, 16, 16, 1))
    # compiled once per module: eager flax on a ViT would compile op by op
    direct = jax.jit(method._logits)
    return method, frozen, trainable, state, images, direct


def test_prompt_shapes_and_prefix_placement(setup):
    method, _, trainable, _, _, _ = setup
    d = CFG5.hidden_size
    assert set(trainable["g_prompt"]) == {"0", "1"}
    assert all(p.shape == (2, 3, d) for p in trainable["g_prompt"].values())
    assert set(trainable["e_prompt"]) == {"2", "3", "4"}
    # pool size defaults to the number of tasks: one E-prompt per task
    assert all(p.shape == (NUM_TASKS, 2, 2, d) for p in trainable["e_prompt"].values())
    assert trainable["e_keys"].shape == (NUM_TASKS, d)

    idx = jnp.array([[2], [0], [1], [2]])
    ctx = method.context(trainable, idx)
    assert sorted(ctx.layers) == [0, 1, 2, 3, 4]
    for layer in (0, 1):  # G: the same prefix for every example
        g = np.asarray(trainable["g_prompt"][str(layer)])
        np.testing.assert_array_equal(ctx.layers[layer].prefix_key, g[0])
        np.testing.assert_array_equal(ctx.layers[layer].prefix_value, g[1])
    for layer in (2, 3, 4):  # E: each example's own pool entry, key half / value half
        pool = np.asarray(trainable["e_prompt"][str(layer)])
        assert ctx.layers[layer].prefix_key.shape == (4, 2, d)
        np.testing.assert_array_equal(ctx.layers[layer].prefix_key, pool[idx[:, 0], 0])
        np.testing.assert_array_equal(ctx.layers[layer].prefix_value, pool[idx[:, 0], 1])


def test_test_time_selection_is_top1_cosine_and_reported_as_task_pred(setup):
    method, frozen, trainable, state, images, direct = setup
    q = np.asarray(frozen_query(BACKBONE, frozen, {"inputs": images}))
    # keys near a few queries, so that different examples pick different E-prompts
    keys = np.stack([q[0] + 0.1, q[3] - 0.05, q[5] * 1.3]).astype(np.float32)
    trainable = dict(trainable, e_keys=jnp.asarray(keys))
    expected = np.argmax(np_cosine(q, keys), axis=1)
    assert len(set(expected.tolist())) > 1
    logits, task_pred = jax.jit(method.logits)(trainable, state, frozen, {"inputs": images},
                                               spec(2))  # the task index traced, as in the loop
    np.testing.assert_array_equal(task_pred, expected)
    # the logits are those of the prompted model with exactly these E-prompts
    np.testing.assert_allclose(logits,
                               direct(trainable, frozen, images, jnp.asarray(expected)[:, None]),
                               rtol=1e-5, atol=1e-5)
    # the official CIFAR-100 config's batch-wise choice: the batch's most frequent top-1
    batchwise = make_method(batchwise_prompt=True).select(trainable, jnp.asarray(q))
    counts = np.bincount(expected, minlength=NUM_TASKS)
    np.testing.assert_array_equal(batchwise[:, 0], np.full(8, np.argmax(counts)))


def test_training_uses_the_true_task_prompt_and_pulls_its_key(setup):
    method, frozen, trainable, state, images, direct = setup
    t = 1
    labels = jnp.array([2, 3] * 4)
    batch = {"inputs": images, "label": labels}
    (loss, aux), grads = jax.jit(jax.value_and_grad(
        lambda tr: method.loss(tr, state, frozen, batch, jax.random.key(3), spec(t)),
        has_aux=True))(trainable)
    q = np.asarray(frozen_query(BACKBONE, frozen, {"inputs": images}))
    matching = np.mean(1.0 - np_cosine(q, trainable["e_keys"])[:, t])
    np.testing.assert_allclose(aux["metrics"]["key_matching"], matching, rtol=1e-5)
    logits = np.asarray(direct(trainable, frozen, images, jnp.full((8, 1), t, jnp.int32)),
                        np.float64)
    task_logits = logits[:, list(TASK_CLASSES[t])]  # the train mask keeps task t's classes
    log_p = task_logits - np.log(np.exp(task_logits).sum(1, keepdims=True))
    ce = -np.mean(log_p[np.arange(8), np.asarray(labels) - 2])
    np.testing.assert_allclose(aux["metrics"]["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(loss, ce + 1.0 * matching, rtol=1e-5)

    for layer, g in grads["e_prompt"].items():
        g = np.asarray(g)
        assert np.abs(g[t]).sum() > 0, layer
        assert np.all(g[[0, 2]] == 0.0), layer  # other tasks' E-prompts get nothing
    key_grad = np.asarray(grads["e_keys"])
    assert np.abs(key_grad[t]).sum() > 0 and np.all(key_grad[[0, 2]] == 0.0)
    assert all(np.abs(np.asarray(g)).sum() > 0 for g in grads["g_prompt"].values())
    bias = np.asarray(grads["head"]["bias"])
    assert np.all(bias[[0, 1, 4, 5]] == 0.0) and np.all(np.abs(bias[[2, 3]]) > 0)


def test_new_task_starts_from_the_previous_e_prompt(setup):
    method, frozen, trainable, state, _, _ = setup
    moved, _ = method.before_task(spec(1), trainable, state, frozen, None, jax.random.key(0))
    for layer, pool in moved["e_prompt"].items():
        old = np.asarray(trainable["e_prompt"][layer])
        pool = np.asarray(pool)
        np.testing.assert_array_equal(pool[1], old[0])
        np.testing.assert_array_equal(pool[[0, 2]], old[[0, 2]])
    np.testing.assert_array_equal(moved["e_keys"], trainable["e_keys"])  # keys keep their own
    same, _ = make_method(shared_prompt_pool=False).before_task(
        spec(1), trainable, state, frozen, None, jax.random.key(0))
    np.testing.assert_array_equal(same["e_prompt"]["2"], trainable["e_prompt"]["2"])


def test_end_to_end_shares_g_and_freezes_old_e_prompts(tmp_path):
    config = tiny_config("dualprompt", g_layers=(0,), e_layers=(1,), g_prompt_length=2,
                         e_prompt_length=2)  # ViT-Micro has two blocks
    config.scenario.num_tasks = 2
    config.train.checkpoint_every_steps = 0  # task-end checkpoints only (read below)
    results = train_and_evaluate(config, str(tmp_path))
    assert [len(r) for r in results["task_identity_matrix"]] == [1, 2]
    assert all(0.0 <= v <= 100.0 for row in results["task_identity_matrix"] for v in row)
    d, pool = 32, 2
    assert results["trainable_params"] == (2 * 2 * d + pool * 2 * 2 * d + pool * d
                                           + d * 10 + 10)
    ckpt = Checkpointer(str(tmp_path))
    after0 = ckpt.restore("tasks", 0)["trainable"]
    after1 = ckpt.restore("tasks", 1)["trainable"]
    ckpt.close()
    # task 0's E-prompt and key are untouched while task 1 trains (bit for bit) ...
    np.testing.assert_array_equal(after1["e_prompt"]["1"][0], after0["e_prompt"]["1"][0])
    np.testing.assert_array_equal(after1["e_keys"][0], after0["e_keys"][0])
    # ... task 1's own entry and the shared G-prompt keep learning
    assert not np.array_equal(after1["e_prompt"]["1"][1], after0["e_prompt"]["1"][0])
    assert not np.array_equal(after1["e_keys"][1], after0["e_keys"][1])
    assert not np.array_equal(after1["g_prompt"]["0"], after0["g_prompt"]["0"])


@pytest.mark.parametrize("benchmark,classes,expected", [("cifar100", 100, 330_340),
                                                        ("imagenet_r", 200, 1_098_440)])
def test_paper_configuration_trainable_parameters(benchmark, classes, expected):
    config = load_config("dualprompt", benchmark)
    backbone = Backbone(vit.get_config("ViT-B/16", num_classes=0))
    method = create_method("dualprompt", config.method, backbone, classes,
                           config.scenario.num_tasks)
    shapes = jax.eval_shape(lambda key: method.init(key, None)[0], jax.random.key(0))
    d, tasks = 768, 10
    e_length = 5 if benchmark == "cifar100" else 20
    formula = (2 * (2 * 5 * d)                    # G-prompt: 2 layers x (5 key + 5 value) x D
               + tasks * 3 * (2 * e_length * d)   # E-prompts: pool 10 x 3 layers x 2L_e x D
               + tasks * d                        # E-keys
               + d * classes + classes)           # linear head
    assert formula == expected
    assert count_params(shapes) == expected


def test_bad_configuration_fails_clearly():
    with pytest.raises(ValueError, match="pool_size=2 is smaller"):
        make_method(pool_size=2)
    with pytest.raises(ValueError, match="overlap at blocks \\[2\\]"):
        make_method(g_layers=(0, 1, 2))
    with pytest.raises(ValueError, match="layers \\[7\\] do not exist"):
        make_method(e_layers=(2, 7))


def test_a_batch_that_cuts_a_vote_group_short_is_refused_before_anything_trains(tmp_path,
                                                                                   caplog):
    """The batch-wise vote runs in groups of batchwise_group consecutive examples (the
    official per-device batch): an eval batch of 64 with groups of 24 would end in a group
    of 16 and shift the groups after it, so the trainer refuses it with the fix; a multiple
    passes, and without the vote there are no groups to cut."""
    group = (24, "method.batchwise_group")
    assert make_method(batchwise_prompt=True, batchwise_group=24).batch_groups == {
        "train.batch_size": group, "eval.batch_size": group}
    assert make_method(batchwise_group=24).batch_groups == {}
    c = tiny_config("dualprompt", g_layers=(0,), e_layers=(1,), batchwise_prompt=True,
                    batchwise_group=24)
    c.train.batch_size = 48
    with pytest.raises(ValueError, match=r"eval.batch_size=64 is not a multiple of "
                                         r"dualprompt's groups of 24 .*\(e\.g\. 48\)"):
        train_and_evaluate(c, str(tmp_path / "cut"))
    assert not (tmp_path / "cut" / "results.json").exists()
    check_batch_groups(make_method(batchwise_prompt=True, batchwise_group=24),
                       {"train.batch_size": 192, "eval.batch_size": 192})  # no error
    with pytest.raises(ValueError, match=r"train.batch_size=200 .*method.batchwise_group=0"):
        check_batch_groups(make_method(batchwise_prompt=True, batchwise_group=24),
                           {"train.batch_size": 200, "eval.batch_size": 192})
    # evaluating a saved run, whose config cannot change: a warning, the eval batch only
    with caplog.at_level(logging.WARNING, logger="pecft_jax"):
        check_batch_groups(make_method(batchwise_prompt=True, batchwise_group=24),
                           {"eval.batch_size": 256}, refuse=False)
    assert "eval.batch_size=256 is not a multiple" in caplog.text
