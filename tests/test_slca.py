"""SLCA against independent computations: the logit normalisation and the class statistics
(numpy), the alignment's sampling distribution (means shrunk as the official code does,
covariance + ridge), per-task heads frozen after their task, the pre-alignment head
recalled, the slow learner as a parameter group, and the paper configuration's sizes."""
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pecft_jax.backbones import vit
from pecft_jax.backbones.backbone import Backbone, load_backbone
from pecft_jax.methods import create_method
from pecft_jax.methods import statistics as stats_lib
from pecft_jax.methods.base import count_params
from pecft_jax.methods.slca import task_logit_norm
from pecft_jax.train.loop import train_and_evaluate

from helpers import (array_task_data, load_experiment_config, task_checkpoints, task_spec,
                     tiny_config)


def test_logit_norm_equals_the_official_formula():
    rng = np.random.default_rng(0)
    owner = np.array([0, 0, 1, 1, 1, 2, 2])
    z = rng.normal(size=(4, 7)).astype(np.float32)
    seen = np.array([1, 1, 1, 1, 1, 0, 0], bool)  # tasks 0 and 1 seen
    got = np.asarray(task_logit_norm(jnp.asarray(z), seen, owner, 0.1))
    norms = [np.linalg.norm(z[:, owner == t], axis=1) + 1e-7 for t in (0, 1)]
    want = z / ((norms[0] + norms[1]) / 2)[:, None] / 0.1
    np.testing.assert_allclose(got[:, :5], want[:, :5], rtol=1e-5)
    # the gradient flows through the norm (not detached)
    g = jax.grad(lambda x: task_logit_norm(x, seen, owner, 0.1)[0, 0])(jnp.asarray(z))
    assert np.abs(np.asarray(g)[0, 1:5]).max() > 0


def test_mean_scales_and_the_alignment_draws():
    scales = stats_lib.mean_scales(np.array([0, 0, 1, 2]), 2, 0.1)
    np.testing.assert_allclose(scales, [0.9 + 0.1 / 3, 0.9 + 0.1 / 3, 0.9 + 0.2 / 3, 1.0],
                               rtol=1e-6)
    rng = np.random.default_rng(1)
    stats = stats_lib.empty_statistics(3, 2)
    feats = np.concatenate([rng.normal([2, -1], [1.0, 0.5], size=(200, 2)),
                            rng.normal([-3, 4], [0.3, 2.0], size=(200, 2))])
    labels = np.repeat([0, 1], 200)
    stats = stats_lib.update_statistics(stats, feats, labels, [0, 1])
    comps = stats_lib.alignment_components(stats, [0, 1], ridge=0.5, scales=np.array([0.5, 1, 1]))
    x, y = stats_lib.sample_components(jax.random.key(0), comps, 40_000)
    x, y = np.asarray(x), np.asarray(y)
    for c, scale in ((0, 0.5), (1, 1.0)):
        drawn = x[y == c]
        np.testing.assert_allclose(drawn.mean(0), scale * stats["mean"][c], atol=0.03)
        np.testing.assert_allclose(np.cov(drawn.T), stats["cov"][c] + 0.5 * np.eye(2),
                                   rtol=0.05, atol=0.03)
    assert not comps["valid"][2]  # an unseen class is never drawn


@pytest.fixture(scope="module")
def micro():
    return load_backbone("random:ViT-Micro/4")


def test_statistics_are_numpy_mean_and_covariance_of_new_classes(micro):
    backbone, frozen = micro
    # a pre-trained final norm that is not the identity, so that replacing it shows
    frozen = dict(frozen, Transformer=dict(frozen["Transformer"], encoder_norm={
        "scale": jnp.full((32,), 1.5), "bias": jnp.full((32,), 0.1)}))
    tasks = [[0, 1], [2, 3]]
    method = create_method("slca", {}, backbone, 4, 2)
    trainable, state = method.init(jax.random.key(0), frozen)
    norm = trainable["backbone"]["Transformer"]["encoder_norm"]  # official: a fresh LayerNorm
    assert np.all(np.asarray(norm["scale"]) == 1) and np.all(np.asarray(norm["bias"]) == 0)
    assert not np.array_equal(norm["scale"], frozen["Transformer"]["encoder_norm"]["scale"])
    rng = np.random.default_rng(0)
    for t, classes in enumerate(tasks):
        labels = np.repeat(classes, 20)
        images = rng.normal(size=(len(labels), 16, 16, 1)).astype(np.float32)
        before = jax.tree_util.tree_map(np.asarray, trainable)
        trainable, state = method.after_task(task_spec(t, tasks), trainable, state, frozen,
                                             array_task_data(images, labels), jax.random.key(t))
        feats = np.asarray(backbone.apply(trainable["backbone"], images, output="cls"),
                           np.float64)
        for c in classes:
            np.testing.assert_allclose(state["stats"]["mean"][c], feats[labels == c].mean(0),
                                       rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(state["stats"]["cov"][c], np.cov(feats[labels == c].T),
                                       rtol=1e-4, atol=1e-5)
        # the trainable head is recalled (the un-aligned one); prediction uses the aligned
        jax.tree_util.tree_map(np.testing.assert_array_equal, trainable, before)
        aligned = not np.array_equal(state["head"]["kernel"], trainable["head"]["kernel"])
        assert aligned == (t > 0)


def test_slow_learner_and_frozen_old_heads_through_the_loop():
    workdir = tempfile.mkdtemp()
    c = tiny_config("slca")
    c.scenario.num_tasks = 2
    c.method.ca_samples = 16
    c.train.optimizer, c.train.momentum, c.train.weight_decay = "sgd", 0.9, 5e-4
    c.train.lr_mults = (("^backbone/", 0.01),)
    results = train_and_evaluate(c, workdir)
    assert results["compilation"]["traces"] == {"train_step": 1, "eval_step": 1}
    first, second = task_checkpoints(workdir, (0, 1))
    classes0 = list(range(5))  # remapped labels: task 0 owns 0..4 of the 10 digits
    k0, k1 = (np.asarray(s["trainable"]["head"]["kernel"]) for s in (first, second))
    np.testing.assert_array_equal(k1[:, classes0], k0[:, classes0])  # frozen after task 0
    assert not np.array_equal(k1[:, 5:], k0[:, 5:])                 # task 1's head learnt
    # the backbone moved, slowly
    delta = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()),
                                   second["trainable"]["backbone"], first["trainable"]["backbone"])
    assert 0 < max(jax.tree_util.tree_leaves(delta))


def test_paper_configuration_sizes_and_values():
    vit_b = Backbone(vit.get_config("ViT-B/16", num_classes=0))
    frozen = jax.eval_shape(lambda k: vit.init_params(vit_b.config, k), jax.random.key(0))
    method = create_method("slca", {}, vit_b, 100, 10)
    trainable, state = jax.eval_shape(method.init, jax.random.key(0), frozen)
    assert count_params(trainable) == 85_798_656 + 76_900  # backbone + 100-class head
    assert state["stats"]["cov"].shape == (100, 768, 768)   # 236 MB of float32
    c = load_experiment_config("slca", "cifar100")  # official slca_cifar.json, slca.py
    assert (c.train.epochs, tuple(c.train.milestones), c.train.learning_rate,
            c.train.batch_size, c.train.weight_decay, c.train.momentum) == \
        (20, (18,), 0.01, 128, 5e-4, 0.9)
    assert tuple(map(tuple, c.train.lr_mults)) == (("^backbone/", 0.01),)
    assert tuple(c.backbone.mean) == (0.5071, 0.4867, 0.4408)
    c = load_experiment_config("slca", "imagenet_r")  # official slca_imgnetr.json
    assert (c.train.epochs, tuple(c.train.milestones)) == (50, (40,))
    assert (c.method.ca_epochs, c.method.logit_norm, c.method.ridge) == (5, 0.1, 1e-4)
