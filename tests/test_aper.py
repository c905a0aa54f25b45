"""APER against independent computations: the concatenated prototypes and the cosine
classifier (numpy), first-session-only adaptation through the loop, the five variants'
trainable parts, and the paper configurations' sizes."""
import os
import tempfile

import jax
import numpy as np
import pytest

from pecft_jax.backbones import vit
from pecft_jax.backbones.backbone import Backbone, load_backbone
from pecft_jax.methods import create_method
from pecft_jax.methods.base import count_params
from pecft_jax.peft.modules import module_context
from pecft_jax.train.checkpoint import Checkpointer
from pecft_jax.train.loop import train_and_evaluate

from helpers import (array_task_data, class_dependent_tasks, load_experiment_config, task_spec,
                     tiny_config)

TASKS = [[0, 1, 2], [3, 4, 5]]


@pytest.fixture(scope="module")
def micro():
    backbone, frozen = load_backbone("random:ViT-Micro/4")
    return backbone, frozen, class_dependent_tasks(TASKS, 12)


def test_prototypes_are_class_means_of_pretrained_and_adapted_features(micro):
    backbone, frozen, data = micro
    method = create_method("aper", {"adapter": {"bottleneck_dim": 4}}, backbone, 6, 2)
    trainable, state = method.init(jax.random.key(0), frozen)
    # stand in for task 0's training: a non-zero adapter, so the two halves differ
    trainable = jax.tree_util.tree_map(
        lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), trainable)
    module = trainable["peft"]
    sums = np.zeros((6, 64))
    for t, (images, labels) in enumerate(data):
        trainable, state = method.after_task(task_spec(t, TASKS), trainable, state, frozen,
                                             array_task_data(images, labels), jax.random.key(2))
        assert set(trainable) == {"peft"}  # the first task's classifier is gone
        pre = np.asarray(backbone.apply(frozen, images, output="cls"), np.float64)
        context = module_context("adapter", method.config.adapter, module)
        adapted = np.asarray(backbone.apply(frozen, images, context, output="cls"), np.float64)
        assert np.abs(pre - adapted).max() > 1e-3
        feats = np.concatenate([pre, adapted], 1)  # [pre-trained, adapted], 2 x 32 wide
        for c in TASKS[t]:
            sums[c] = feats[labels == c].mean(0)
        protos = np.asarray(state["sum"]) / np.maximum(np.asarray(state["count"]), 1)[:, None]
        np.testing.assert_allclose(protos, sums, rtol=1e-5, atol=1e-5)
        logits = np.asarray(method.logits(trainable, state, frozen, {"inputs": images[:5]},
                                          task_spec(t, TASKS)))
        unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
        expected = unit(feats[:5]) @ unit(sums).T
        np.testing.assert_allclose(logits[:, :3 * (t + 1)], expected[:, :3 * (t + 1)],
                                   atol=1e-5)


@pytest.mark.parametrize("variant,kind", [("adapter", "peft"), ("ssf", "peft"),
                                          ("vpt_deep", "peft"), ("vpt_shallow", "peft"),
                                          ("finetune", "backbone")])
def test_each_variant_trains_its_part_and_a_cosine_head(micro, variant, kind):
    backbone, frozen, _ = micro
    method = create_method("aper", {"variant": variant}, backbone, 6, 2)
    trainable, state = method.init(jax.random.key(0), frozen)
    assert set(trainable) == {kind, "first_head"}
    assert trainable["first_head"]["sigma"] == 1.0
    assert state["sum"].shape == (6, 2 * backbone.feature_dim)
    if variant.startswith("vpt"):  # official vpt.py: zero-initialised prompt tokens
        assert all(np.all(np.asarray(p) == 0) for p in jax.tree_util.tree_leaves(trainable[kind]))
        assert len(trainable[kind]) == (1 if variant == "vpt_shallow" else 2)
    if variant == "finetune":
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(
            lambda a, b: bool(np.array_equal(a, b)), trainable["backbone"], frozen))
    assert method.train_epochs(task_spec(0, TASKS), 7) == 7
    assert method.train_epochs(task_spec(1, TASKS), 7) == 0


def test_adaptation_happens_on_the_first_task_only():
    workdir = tempfile.mkdtemp()
    c = tiny_config("aper")
    c.train.optimizer, c.train.momentum, c.train.learning_rate = "sgd", 0.9, 0.05
    results = train_and_evaluate(c, workdir)
    ckpt = Checkpointer(os.path.join(workdir))
    try:
        first = ckpt.restore("tasks", 0)["trainable"]
        last = ckpt.restore("tasks", 4)["trainable"]
    finally:
        ckpt.close()
    steps_first_task = results["train_steps"]
    assert steps_first_task > 0
    assert set(first) == set(last) == {"peft"}
    assert np.abs(first["peft"]["0"]["mlp"]["up"]["kernel"]).max() > 0  # it was trained
    jax.tree_util.tree_map(np.testing.assert_array_equal, first, last)
    # only task 0 took gradient steps: the steps equal one task's epochs
    assert results["compilation"]["traces"] == {"train_step": 1, "eval_step": 1}


def test_paper_configuration_sizes():
    vit_b = Backbone(vit.get_config("ViT-B/16", num_classes=0))
    frozen = jax.eval_shape(lambda k: vit.init_params(vit_b.config, k), jax.random.key(0))
    expected = {"adapter": 1_189_632,       # 12 x (768*64 + 64 + 64*768 + 768), official log
                "ssf": 205_824,             # 12 x 16,896 + patch embedding + final norm,
                                            # official log
                "vpt_shallow": 3_840,       # 5 x 768
                "vpt_deep": 46_080,         # 12 x 5 x 768
                "finetune": 85_798_656}     # the whole ViT-B/16 without a head
    for variant, size in expected.items():
        method = create_method("aper", {"variant": variant}, vit_b, 100, 10)
        trainable, state = jax.eval_shape(method.init, jax.random.key(0), frozen)
        part = {k: v for k, v in trainable.items() if k != "first_head"}
        assert count_params(part) == size, variant
        assert count_params(trainable["first_head"]) == 768 * 100 + 1
        assert state["sum"].shape == (100, 1536)  # prototypes of [pre-trained, adapted]


def test_experiment_configs_follow_the_official_values():
    c = load_experiment_config("aper", "cifar100")  # RevisitingCIL@6ab97dc adam_adapter.json
    assert (c.method.variant, c.train.epochs, c.train.learning_rate, c.train.batch_size,
            c.train.weight_decay) == ("adapter", 20, 0.01, 48, 5e-4)
    assert (c.train.optimizer, c.train.momentum, c.train.schedule) == ("sgd", 0.9,
                                                                       "cosine_epochs")
    assert c.scenario.class_order == "pycil" and c.scenario.seed == 1993
    assert tuple(c.backbone.mean) == (0.0,) and tuple(c.backbone.std) == (1.0,)
    c = load_experiment_config("aper", "cifar100,vpt_shallow")  # adam_vpt_shallow.json
    assert (c.train.epochs, c.train.batch_size) == (50, 24)
    c = load_experiment_config("aper", "imagenet_r,vpt_deep")  # PILOT aper_vpt_deep_inr.json
    assert (c.train.epochs, c.train.learning_rate, c.train.batch_size,
            c.method.vpt_deep.length) == (20, 0.05, 24, 30)
    c = load_experiment_config("aper", "imagenet_r")  # PILOT aper_aperpter_inr.json
    assert (c.train.epochs, c.train.learning_rate, c.train.batch_size,
            c.train.weight_decay) == (10, 0.05, 16, 5e-3)
    assert "imagenet2012" in c.backbone.checkpoint
