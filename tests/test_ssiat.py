"""SSIAT against independent computations: the semantic shift of old class means (the
official formula written out per class), the statistics and the CosFace loss (numpy),
old heads frozen while the shared adapter trains, and the paper configuration's sizes."""
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pecft_jax import peft
from pecft_jax.backbones import vit
from pecft_jax.backbones.backbone import Backbone, load_backbone
from pecft_jax.methods import create_method
from pecft_jax.methods.base import count_params
from pecft_jax.methods.ssiat import official_pairs, semantic_shift
from pecft_jax.train.loop import train_and_evaluate

from helpers import (array_task_data, load_experiment_config, task_checkpoints, task_spec,
                     tiny_config)


def reference_shift(y1, y2, means, sigma):
    """The official ``displacement``: per class, normalised Gaussian-kernel weights of the
    drifts ``y2 - y1``, the kernel of ``||y1_i - mu_c||`` plus a 1e-5 floor."""
    out = np.zeros_like(means)
    for c, mu in enumerate(means):
        w = np.exp(-np.sum((y1 - mu) ** 2, axis=1) / (2 * sigma ** 2)) + 1e-5
        out[c] = (w / w.sum()) @ (y2 - y1)
    return out


def test_semantic_shift_equals_the_official_displacement():
    rng = np.random.default_rng(0)
    y1 = rng.normal(size=(30, 6)) * 3
    y2 = y1 + rng.normal(size=(30, 6)) * 0.5 + 0.2
    means = np.concatenate([y1[:2] + 0.1, rng.normal(size=(1, 6)) * 40])  # one far away
    weight = np.ones(30)
    weight[25:] = 0  # padding rows take no part
    carry = {"num": jnp.zeros((3, 6)), "den": jnp.zeros((3,))}
    for lo in (0, 10, 20):  # a reduction over three batches
        carry = semantic_shift(carry, jnp.asarray(y1[lo:lo + 10], jnp.float32),
                               jnp.asarray(y2[lo:lo + 10], jnp.float32),
                               jnp.asarray(means, jnp.float32),
                               jnp.asarray(weight[lo:lo + 10], jnp.float32), 4.0)
    got = np.asarray(carry["num"]) / np.asarray(carry["den"])[:, None]
    want = reference_shift(y1[:25], y2[:25], means, 4.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # the far class's kernel underflows: the 1e-5 floor makes it the mean drift
    np.testing.assert_allclose(got[2], (y2[:25] - y1[:25]).mean(0), rtol=1e-4)


@pytest.fixture(scope="module")
def micro():
    return load_backbone("random:ViT-Micro/4")


@pytest.mark.parametrize("pairing", ["same_image", "official"])
def test_after_task_shifts_old_means_and_adds_new_statistics(micro, pairing):
    """The drift of the old class means is the official ``displacement``: 'same_image' on
    each un-augmented image under the adapter before and after the task; 'official' on two
    augmented views (view 0 before, view 1 after) paired by ``official_pairs``, as the
    released code's two shuffled passes. The new classes' statistics are the plain images'
    either way."""
    backbone, frozen = micro
    tasks = [[0, 1], [2, 3], [4, 5]]  # the third never runs: its heads must stay as drawn
    method = create_method("ssiat", {"adapter": {"bottleneck_dim": 4}, "ca_samples": 8,
                                     "shift_pairing": pairing}, backbone, 6, 3)
    trainable, state = method.init(jax.random.key(0), frozen)
    rng = np.random.default_rng(0)
    data = []
    for classes in tasks[:2]:
        labels = np.repeat(classes, 16)
        data.append((rng.normal(size=(len(labels), 16, 16, 1)).astype(np.float32), labels))

    def feats(adapter, images):
        return np.asarray(backbone.apply(frozen, images, peft.adapter_context(
            adapter, method.config.adapter), output="cls"), np.float64)

    trainable, state = method.after_task(task_spec(0, tasks), trainable, state, frozen,
                                         array_task_data(*data[0]), jax.random.key(1))
    means0 = np.array(state["stats"]["mean"], np.float64)
    cov0 = np.array(state["stats"]["cov"])
    trainable, state = method.before_task(task_spec(1, tasks), trainable, state, frozen, None,
                                          jax.random.key(2))
    before = jax.tree_util.tree_map(np.asarray, state["adapter_before"])
    # stand in for task 1's training: the shared adapter moves
    trainable["adapter"] = jax.tree_util.tree_map(
        lambda x: x + 0.3 * jax.random.normal(jax.random.key(3), x.shape), trainable["adapter"])
    images, labels = data[1]
    head_before = np.asarray(trainable["head"]["kernel"])
    view = lambda e: np.roll(images, 2 * e + 1, axis=1)  # stand-ins for two random crops
    seen = []
    task_data = array_task_data(images, labels,
                                augmented=lambda e: (seen.append(e), view(e))[1])
    trainable, state = method.after_task(task_spec(1, tasks), trainable, state, frozen,
                                         task_data, jax.random.key(4))
    head = np.asarray(trainable["head"]["kernel"])
    assert not np.array_equal(head[:, :4], head_before[:, :4])  # re-trained on the Gaussians
    np.testing.assert_array_equal(head[:, 4:], head_before[:, 4:])  # later tasks' untouched
    y2 = feats(trainable["adapter"], images)
    if pairing == "same_image":
        assert seen == []
        shift = reference_shift(feats(before, images), y2, means0[:2], 4.0)
    else:
        assert seen == [0, 1]
        pairs = official_pairs(jax.random.fold_in(jax.random.key(4), 1), len(images))
        assert sorted(pairs) == list(range(len(images))) and np.any(pairs != np.arange(32))
        shift = reference_shift(feats(before, view(0)),
                                feats(trainable["adapter"], view(1))[pairs], means0[:2], 4.0)
    assert np.abs(shift).max() > 1e-3
    np.testing.assert_allclose(state["stats"]["mean"][:2], means0[:2] + shift, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_array_equal(state["stats"]["cov"][:2], cov0[:2])  # not shifted
    for c in tasks[1]:
        np.testing.assert_allclose(state["stats"]["mean"][c], y2[labels == c].mean(0),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state["stats"]["cov"][c], np.cov(y2[labels == c].T),
                                   rtol=1e-4, atol=1e-5)


def test_cosface_loss(micro):
    backbone, frozen = micro
    method = create_method("ssiat", {"margin": 0.3, "adapter": {"bottleneck_dim": 4}},
                           backbone, 4, 2)
    trainable, state = method.init(jax.random.key(0), frozen)
    images = np.random.default_rng(0).normal(size=(6, 16, 16, 1)).astype(np.float32)
    labels = np.array([2, 3, 2, 3, 3, 2])
    task = task_spec(1, [[0, 1], [2, 3]])
    loss, _ = method.loss(trainable, state, frozen, {"inputs": images, "label": labels},
                          jax.random.key(1), task)
    f = np.asarray(backbone.apply(frozen, images, peft.adapter_context(
        trainable["adapter"], method.config.adapter), output="cls"), np.float64)
    w = np.asarray(trainable["head"]["kernel"], np.float64)[:, 2:]  # the current task only
    cos = (f / np.linalg.norm(f, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0))
    local = labels - 2
    z = 20 * (cos - 0.3 * np.eye(2)[local])
    want = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(6), local])
    assert float(loss) == pytest.approx(want, rel=1e-4)


def test_old_heads_frozen_and_epochs_per_task():
    workdir = tempfile.mkdtemp()
    c = tiny_config("ssiat")
    c.scenario.num_tasks = 2
    c.method.adapter = {"bottleneck_dim": 4}
    c.method.incremental_epochs = 2
    c.method.ca_epochs = 0  # the re-training would rewrite every head after task 1
    c.train.optimizer, c.train.momentum, c.train.weight_decay = "sgd", 0.9, 5e-4
    results = train_and_evaluate(c, workdir)
    per_epoch = results["train_steps"] // 3  # 1 epoch on task 0, 2 on task 1
    assert per_epoch > 0 and results["train_steps"] == 3 * per_epoch
    first, second = task_checkpoints(workdir, (0, 1), "trainable")
    # the shared adapter keeps training
    assert not np.array_equal(first["adapter"]["0"]["mlp"]["up"]["kernel"],
                              second["adapter"]["0"]["mlp"]["up"]["kernel"])
    # task 0's heads get no loss gradient, only the official optimizer's coupled weight
    # decay (through momentum): every entry shrinks by one common factor, direction kept
    k0, k1 = np.asarray(first["head"]["kernel"]), np.asarray(second["head"]["kernel"])
    ratio = k1[:, :5] / k0[:, :5]
    assert 0.99 < ratio.mean() < 1.0 and np.ptp(ratio) < 1e-5
    assert not np.allclose(k1[:, 5:] / k0[:, 5:], ratio.mean(), rtol=1e-3)  # task 1's learnt


def test_paper_configuration_sizes_and_values():
    vit_b = Backbone(vit.get_config("ViT-B/16", num_classes=0))
    method = create_method("ssiat", {}, vit_b, 200, 10)
    trainable, state = jax.eval_shape(lambda k: method.init(k, None), jax.random.key(0))
    assert count_params(trainable["adapter"]) == 1_189_632  # "Params 1.19M" in the README
    assert count_params(trainable["head"]) == 153_600       # 200 bias-free cosine heads
    assert state["stats"]["cov"].shape == (200, 768, 768)
    c = load_experiment_config("ssiat", "imagenet_r")  # official adapter_imagenetr.json
    assert (c.train.epochs, c.method.incremental_epochs, c.train.learning_rate,
            c.train.batch_size, c.train.weight_decay, c.method.scale, c.method.margin,
            c.method.ca_epochs) == (20, 10, 0.01, 48, 5e-4, 20.0, 0.0, 5)
    assert c.scenario.class_order == "pycil" and tuple(c.backbone.std) == (1.0,)
    assert load_experiment_config("ssiat", "cifar100").scenario.num_tasks == 5  # B0 Inc20
    assert c.method.shift_pairing == "official"  # SSITA_adapter.py: two train_loader passes
    assert load_experiment_config("ssiat", "split_mnist").method.shift_pairing == "same_image"
