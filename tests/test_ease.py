"""EASE against independent computations: the semantic-guided prototype complement (both
official forms, written out class by class), the subspace-reweighted logits (numpy over
separate backbone passes), the real prototypes, which adapter each task may change, and
the paper configuration's sizes."""
import os
import tempfile

import jax
import numpy as np
import pytest

from pecft_jax import peft
from pecft_jax.backbones import vit
from pecft_jax.backbones.backbone import Backbone, load_backbone
from pecft_jax.methods import create_method
from pecft_jax.methods.base import count_params
from pecft_jax.methods.ease import complement_prototypes, subspace_weights
from pecft_jax.train.checkpoint import Checkpointer
from pecft_jax.train.loop import train_and_evaluate

from helpers import (array_task_data, class_dependent_tasks, load_experiment_config, task_spec,
                     tiny_config)

TASKS = [[0, 1], [2, 3, 4], [5, 6]]


def reference_complement(p, tasks, t, recalc):
    """The official solve_sim_reset / solve_similarity, one old class at a time."""
    p = p.astype(np.float64).copy()
    for i in range(t):
        for k in (range(i + 1, t + 1) if recalc else [t]):
            ref = sum((tasks[j] for j in range(k if recalc else t, t + 1)), [])
            for c in tasks[i]:
                a = p[c, i]
                sims = np.array([a @ p[r, i] / (np.linalg.norm(a) * np.linalg.norm(p[r, i]))
                                 for r in ref])
                weights = np.exp(sims) / np.exp(sims).sum()
                p[c, k] = sum(w * p[r, k] for w, r in zip(weights, ref))
    return p


@pytest.mark.parametrize("recalc", [True, False])
def test_complement_equals_the_official_formula(recalc):
    rng = np.random.default_rng(0)
    p = rng.normal(size=(7, 3, 5))
    # after task 2: classes of task i are real in subspaces i..2 only where they had images
    real = p.copy()
    real[0:2, 1:] = 0.0    # task 0's classes: no images in subspaces 1, 2
    real[2:5, 2] = 0.0     # task 1's classes: none in subspace 2
    got = complement_prototypes(real, TASKS, 2, recalc=recalc)
    want = reference_complement(real, TASKS, 2, recalc)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # real prototypes never change; every old class now has a prototype in subspace 2
    np.testing.assert_array_equal(got[5:7], real[5:7].astype(np.float32))
    np.testing.assert_array_equal(got[0:2, 0], real[0:2, 0].astype(np.float32))
    assert np.all(np.linalg.norm(got[0:5, 2], axis=-1) > 0)
    if not recalc:  # the paper's form leaves the earlier synthesised blocks alone
        np.testing.assert_array_equal(got[0:2, 1], real[0:2, 1].astype(np.float32))


def test_subspace_weights_follow_forward_reweight():
    owner = np.array([0, 0, 1, 1, 1, 2, 2])
    w = np.asarray(subspace_weights(owner, 4, 2, 0.1))
    for c, g in enumerate(owner):
        for j in range(4):
            want = 1.0 if j == g else (0.1 / 2 if j <= 2 else 0.0)
            assert w[c, j] == pytest.approx(want)
    assert np.asarray(subspace_weights(owner, 4, 0, 0.1))[0].tolist() == [1, 0, 0, 0]
    assert np.asarray(subspace_weights(owner, 4, 2, 0.1, alpha_over_tasks=False))[0, 1] == \
        pytest.approx(0.1)


@pytest.fixture(scope="module")
def micro():
    backbone, frozen = load_backbone("random:ViT-Micro/4")
    return backbone, frozen, class_dependent_tasks(TASKS, 6)


def test_prototypes_and_logits_equal_separate_passes(micro):
    backbone, frozen, data = micro
    method = create_method("ease", {"adapter": {"bottleneck_dim": 4}}, backbone, 7, 3)
    trainable, state = method.init(jax.random.key(0), frozen)
    # stand in for training: every task's adapter different from the pre-trained model
    trainable["adapters"] = jax.tree_util.tree_map(
        lambda x: x + 0.5 * jax.random.normal(jax.random.key(1), x.shape), trainable["adapters"])
    adapter_cfg = method.config.adapter

    def phi(j, images):
        one = jax.tree_util.tree_map(lambda a: a[j], trainable["adapters"])
        return np.asarray(backbone.apply(frozen, images, peft.adapter_context(one, adapter_cfg),
                                         output="cls"), np.float64)

    real = np.zeros((7, 3, 32))
    for t, (images, labels) in enumerate(data):
        trainable, state = method.after_task(task_spec(t, TASKS), trainable, state, frozen,
                                             array_task_data(images, labels), jax.random.key(2))
        for j in range(t + 1):
            feats = phi(j, images)
            for c in TASKS[t]:
                real[c, j] = feats[labels == c].mean(0)
        want = reference_complement(real, TASKS, t, recalc=True)
        np.testing.assert_allclose(state["prototypes"], want, rtol=2e-4, atol=2e-5)
        real = want  # the complemented blocks are the next task's inputs
    images = np.concatenate([d[0][:3] for d in data])
    logits = np.asarray(method.logits(trainable, state, frozen, {"inputs": images},
                                      task_spec(2, TASKS)))
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    feats = [unit(phi(j, images)) for j in range(3)]
    owner = [0, 0, 1, 1, 1, 2, 2]
    expected = np.zeros((len(images), 7))
    for c in range(7):
        for j in range(3):
            weight = 1.0 if j == owner[c] else 0.1 / 2
            expected[:, c] += weight * feats[j] @ unit(real[c, j])
    np.testing.assert_allclose(logits, expected, atol=2e-5)


def test_use_diagonal_keeps_each_prototype_in_its_own_subspace(micro):
    backbone, frozen, data = micro
    method = create_method("ease", {"adapter": {"bottleneck_dim": 4}, "use_diagonal": True},
                           backbone, 7, 3)
    trainable, state = method.init(jax.random.key(0), frozen)
    for t in range(2):
        trainable, state = method.after_task(task_spec(t, TASKS), trainable, state, frozen,
                                             array_task_data(*data[t]), jax.random.key(2))
    norms = np.linalg.norm(np.asarray(state["prototypes"]), axis=-1)  # (C, T)
    assert np.all(norms[0:2, 0] > 0) and np.all(norms[2:5, 1] > 0)  # own subspaces
    assert np.all(norms[0:2, 1:] == 0) and np.all(norms[2:5, [0, 2]] == 0)  # official ablation


def test_only_the_current_tasks_adapter_changes():
    workdir = tempfile.mkdtemp()
    c = tiny_config("ease")
    c.scenario.num_tasks = 5
    c.method.adapter = {"bottleneck_dim": 4}
    c.train.optimizer, c.train.momentum, c.train.learning_rate = "sgd", 0.9, 0.5
    results = train_and_evaluate(c, workdir)
    # one program each: the steps, and the subspace pass the evaluations cache
    assert results["compilation"]["traces"] == {"train_step": 1, "task_features": 1,
                                                "eval_step": 1}
    ckpt = Checkpointer(os.path.join(workdir))
    try:
        after = [ckpt.restore("tasks", t)["trainable"]["adapters"] for t in range(5)]
    finally:
        ckpt.close()
    leaves = lambda tree, j: [np.asarray(x)[j] for x in jax.tree_util.tree_leaves(tree)]
    for t in range(1, 5):
        for j in range(5):
            same = all(np.array_equal(a, b) for a, b in zip(leaves(after[t], j),
                                                            leaves(after[t - 1], j)))
            assert same == (j != t), (t, j)  # task t trains slice t, nothing else moves


def test_paper_configuration_sizes():
    vit_b = Backbone(vit.get_config("ViT-B/16", num_classes=0))
    method = create_method("ease", {}, vit_b, 100, 10)
    trainable, state = jax.eval_shape(lambda k: method.init(k, None), jax.random.key(0))
    assert count_params(trainable["adapters"]) == 10 * 1_189_632  # official log, per task
    assert method.count_trainable(trainable, state) == 11_896_320
    assert state["prototypes"].shape == (100, 10, 768)  # N x 768 T, the official fc
    c = load_experiment_config("ease", "imagenet_r")  # official ease_inr_in21k.json
    assert (c.train.epochs, c.train.learning_rate, c.train.batch_size, c.train.weight_decay,
            c.method.alpha, c.method.recalc_sim) == (20, 0.05, 16, 5e-3, 0.1, True)
    c = load_experiment_config("ease", "cifar100,inc5")  # official ease_cifar_in21k.json
    assert (c.scenario.num_tasks, c.train.learning_rate, c.train.batch_size) == (20, 0.025, 48)
    assert c.scenario.class_order == "pycil" and tuple(c.backbone.std) == (1.0,)
