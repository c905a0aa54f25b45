"""LAE against independent computations: the offline module is the EMA of the online one
step by step (numpy recursion), the ensemble is the per-class maximum of the two experts'
softmax, the module waits for its first epochs with its Adam state untouched (a group
started late equals a fresh Adam), and the official modules' sizes."""
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pecft_jax.backbones import vit
from pecft_jax.backbones.backbone import Backbone, load_backbone
from pecft_jax.methods import create_method
from pecft_jax.methods.base import count_params
from pecft_jax.train import partition
from pecft_jax.train.loop import ContinualTrainer, train_and_evaluate

from helpers import task_checkpoints, task_spec, tiny_config

TASKS = [[0, 1], [2, 3]]


@pytest.fixture(scope="module")
def micro():
    return load_backbone("random:ViT-Micro/4")


def test_offline_module_is_the_ema_of_the_online_one(micro):
    backbone, frozen = micro
    method = create_method("lae", {"layers": (0, 1), "ema_decay": 0.9}, backbone, 4, 2)
    trainable, state = method.init(jax.random.key(0), frozen)
    trainable, state = method.before_task(task_spec(1, TASKS), trainable, state, frozen, None,
                                          jax.random.key(1))
    labels = method.param_labels(trainable, task_spec(1, TASKS))
    optimizer = partition.make_optimizer(labels, {"pet": optax.sgd(0.5), "head": optax.sgd(0.5)})
    opt_state = optimizer.init(trainable)
    rng = np.random.default_rng(0)
    offline = jax.tree_util.tree_map(np.asarray, state["offline"])
    online_history = []
    step = jax.jit(lambda tr, st, os, b: method.update(tr, st, os, frozen, b, jax.random.key(2),
                                                       task_spec(1, TASKS), optimizer))
    for _ in range(4):
        batch = {"inputs": rng.normal(size=(6, 16, 16, 1)).astype(np.float32),
                 "label": np.array([2, 3, 2, 3, 3, 2], np.int32)}
        trainable, state, opt_state, _ = step(trainable, state, opt_state, batch)
        online = jax.tree_util.tree_map(np.asarray, trainable["pet"])
        online_history.append(online)
        offline = jax.tree_util.tree_map(lambda off, on: 0.9 * off + 0.1 * on, offline, online)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                           state["offline"], offline)
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()),
                                   online_history[0], online_history[-1])
    assert max(jax.tree_util.tree_leaves(moved)) > 0  # the online module learnt


def test_ensemble_is_the_classwise_maximum_of_the_two_experts(micro):
    backbone, frozen = micro
    method = create_method("lae", {"layers": (0, 1), "module": "lora"}, backbone, 6, 3)
    trainable, state = method.init(jax.random.key(0), frozen)
    noisy = lambda tree, k: jax.tree_util.tree_map(
        lambda x: x + 0.3 * jax.random.normal(jax.random.key(k), x.shape), tree)
    trainable = dict(trainable, pet=noisy(trainable["pet"], 1), head=noisy(trainable["head"], 2))
    state = {"offline": noisy(trainable["pet"], 3)}
    images = np.random.default_rng(0).normal(size=(5, 16, 16, 1)).astype(np.float32)
    tasks = [[0, 1], [2, 3], [4, 5]]
    got = np.asarray(method.logits(trainable, state, frozen, {"inputs": images},
                                   task_spec(1, tasks)))
    seen = [0, 1, 2, 3]

    def probs(pet):
        z = np.asarray(method.expert_logits(pet, trainable["head"], frozen, images),
                       np.float64)[:, seen]
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    want = np.maximum(probs(trainable["pet"]), probs(state["offline"]))
    np.testing.assert_allclose(np.exp(got[:, seen]), want, rtol=1e-5, atol=1e-7)
    assert np.all(np.isneginf(got[:, 4:]))  # unseen classes take no part
    first = np.asarray(method.logits(trainable, state, frozen, {"inputs": images},
                                     task_spec(0, tasks)))  # online alone after task 0
    np.testing.assert_allclose(np.exp(first[:, :2]).sum(1), 1.0, rtol=1e-5)
    assert not np.allclose(first[:, :2], got[:, :2])


def test_a_group_started_late_is_a_fresh_optimizer_from_then_on():
    inner = optax.adam(0.1)
    late = partition.start_after(inner, 3)
    params = jnp.array([1.0, -2.0])
    state, fresh = late.init(params), inner.init(params)
    grads = [jnp.array([0.5, -1.0]), jnp.array([2.0, 0.1]), jnp.array([-1.0, 1.0]),
             jnp.array([0.3, 0.3]), jnp.array([-0.2, 0.7])]
    for i, g in enumerate(grads):
        updates, state = late.update(g, state, params)
        if i < 3:
            np.testing.assert_array_equal(updates, 0.0)
        else:  # as if Adam had only seen the steps since the start (bias correction too)
            want, fresh = inner.update(g, fresh, params)
            np.testing.assert_allclose(updates, want, rtol=1e-6)


def test_the_module_waits_while_the_new_head_learns():
    """Through the loop: with the module frozen for every epoch of task 1, task 1 leaves it
    bit-identical while task 1's head learns; two train steps compile for the run."""
    workdir = tempfile.mkdtemp()
    c = tiny_config("lae", layers=(0, 1), freeze_epochs=2)
    c.scenario.num_tasks = 2
    c.train.epochs = 2
    results = train_and_evaluate(c, workdir)
    assert results["compilation"]["traces"]["train_step"] == 2
    first, second = task_checkpoints(workdir, (0, 1))
    jax.tree_util.tree_map(np.testing.assert_array_equal, second["trainable"]["pet"],
                           first["trainable"]["pet"])
    k0, k1 = (np.asarray(s["trainable"]["head"]["kernel"]) for s in (first, second))
    np.testing.assert_array_equal(k1[:, :5], k0[:, :5])
    assert not np.array_equal(k1[:, 5:], k0[:, 5:])
    # the offline copy started from the online module and stayed there (its EMA towards an
    # unchanged online module moves it by float rounding only)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                           second["state"]["offline"], first["trainable"]["pet"])


def test_each_task_s_optimizer_init_starts_the_module_at_its_own_step(tmp_path):
    """The jitted optimizer init is shared by tasks with the same optimizer key; the step
    at which LAE's module starts is a constant of that program, so tasks whose epochs
    differ in length must each get their own start (a shared program gave task 2 the start
    of task 1)."""
    c = tiny_config("lae", layers=(0, 1), freeze_epochs=1)
    c.train.epochs = 2
    trainer = ContinualTrainer(c, str(tmp_path))
    try:
        run, _ = trainer.restore_or_init()
        lengths = {t: trainer.steps_in_task(trainer.tasks[t], 2) for t in (1, 2, 3, 4)}
        other = [t for t in lengths if lengths[t] != lengths[1]]
        assert other, f"the tiny tasks must differ in length for this test: {lengths}"
        pair = (1, other[0])
        for t in pair:
            spec = trainer.task_spec(t)
            optimizer = trainer.optimizer(spec, run.trainable, trainer.tasks[t], 2)
            ours = trainer.initial_optimizer_state(spec, optimizer, 2, lengths[t],
                                                   run.trainable)
            jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(ours),
                                   jax.device_get(optimizer.init(run.trainable)))
    finally:
        trainer.close()


def test_official_module_sizes():
    vit_b = Backbone(vit.get_config("ViT-B/16", num_classes=0))
    expected = {"adapter": 42_270,  # 5 blocks x (768*5 + 5 + 5*768 + 768 + 1 scale)
                "lora": 76_810,     # 5 blocks x (2 x (5*768 + 768*5) + 2 scales)
                "prefix": 76_810}   # 5 blocks x (2 x 10*768 + 2 scales)
    for module, size in expected.items():
        method = create_method("lae", {"module": module}, vit_b, 100, 10)
        trainable, state = jax.eval_shape(lambda k: method.init(k, None), jax.random.key(0))
        assert count_params(trainable["pet"]) == size, module
        assert count_params(state["offline"]) == size
        assert count_params(trainable["head"]) == 76_900
