"""S-Prompts (S-iPrompts): domain keys, per-domain prompts/heads, end to end on domains."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pecft_jax.backbones import vit
from pecft_jax.backbones.backbone import Backbone, load_backbone
from pecft_jax.methods import TaskSpec, create_method
from pecft_jax.methods.s_prompts import SPrompts
from pecft_jax.backbones.context import LayerPEFT, PEFTContext
from pecft_jax.train.checkpoint import Checkpointer
from pecft_jax.methods.base import count_params
from pecft_jax.train.loop import train_and_evaluate

from helpers import array_task_data, load_experiment_config, tiny_config

CLASSES = tuple(range(10))


def load_config(arg):
    return load_experiment_config("s_prompts", arg)


def domain_config(**options):
    """tiny_config as a domain-incremental scenario: digits, then digits rotated by 90."""
    c = tiny_config("s_prompts", prompt_length=3, num_centroids=2, **options)
    c.scenario.kind = "domain"
    c.scenario.domains = ["digits", "digits+rotate90"]
    c.scenario.num_tasks = 2
    c.scenario.class_order = "identity"
    c.train.optimizer = "sgd"
    c.train.momentum = 0.9
    c.train.learning_rate = 0.05
    c.train.checkpoint_every_steps = 0
    return c


def spec(index, num_tasks=3):
    return TaskSpec(index=index, num_classes=10, task_classes=(CLASSES,) * num_tasks)


@functools.lru_cache(maxsize=1)
def micro_backbone():
    return load_backbone("random:ViT-Micro/4", seed=0)


def micro_method(num_tasks=3, **options):
    backbone, frozen = micro_backbone()
    return SPrompts(domain_config(**options).method, backbone, 10, num_tasks), frozen


def test_domain_prediction_is_the_nearest_stored_centroid():
    method, frozen = micro_method()
    trainable, state = method.init(jax.random.key(0), frozen)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (12, 16, 16, 1)).astype(np.float32)
    q = np.asarray(method.backbone.apply(frozen, images, output="cls"), np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    centroids = rng.standard_normal((3, 2, 32)) * 0.2
    centroids[1, 0] = q[:6].mean(0)  # domain 1 is near the first half ...
    centroids[2, 1] = q[6:].mean(0)  # ... domain 2 (not seen yet at task 1) near the rest
    valid = np.array([[True, True], [True, False], [True, True]])
    state = dict(state, centroids=jnp.asarray(centroids, jnp.float32),
                 centroid_valid=jnp.asarray(valid))
    for t in (1, 2):
        d = np.abs(q[:, None, None, :] - centroids[None]).sum(-1)  # L1, (B, T, K)
        d[:, ~valid] = np.inf
        d[:, t + 1:] = np.inf
        expected = d.min(-1).argmin(-1)
        got = np.asarray(method.predict_domain(state, frozen, {"inputs": jnp.asarray(images)},
                                               spec(t)))
        np.testing.assert_array_equal(got, expected)
    predicted = method.predict_domain(state, frozen, {"inputs": jnp.asarray(images)}, spec(2))
    assert set(np.asarray(predicted)) >= {1, 2}


def test_each_example_gets_its_domains_prompt_and_classifier():
    method, frozen = micro_method()
    trainable, state = method.init(jax.random.key(0), frozen)
    images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (6, 16, 16, 1)), jnp.float32)
    domain = np.array([0, 2, 1, 1, 0, 2])
    # keys that send example i to domain[i]: centroids at the examples' own features
    q = np.asarray(method._query(frozen, {"inputs": images}))
    centroids = np.full((3, 2, 32), 100.0)
    for i, s in enumerate(domain):
        centroids[s, 0 if i < 3 else 1] = q[i]
    state = dict(state, centroids=jnp.asarray(centroids, jnp.float32),
                 centroid_valid=jnp.ones((3, 2), bool))
    logits, task_pred = method.logits(trainable, state, frozen, {"inputs": images}, spec(2))
    np.testing.assert_array_equal(task_pred, domain)
    for i, s in enumerate(domain):
        ctx = PEFTContext({0: LayerPEFT(prompt=trainable["prompts"][str(s)])})
        f = method.backbone.apply(frozen, images[i:i + 1], ctx, output="cls")
        head = trainable["heads"][str(s)]
        np.testing.assert_allclose(logits[i], (f @ head["kernel"] + head["bias"])[0],
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("on_augmented", [True, False])
def test_after_task_keys_are_kmeans_centroids_of_normalised_frozen_features(on_augmented):
    """The keys cluster the augmented pass (the official code clusters its augmented
    training loader) or, as an option, the plain images."""
    method, frozen = micro_method(num_tasks=2, kmeans_on_augmented=on_augmented)
    trainable, state = method.init(jax.random.key(0), frozen)
    rng = np.random.default_rng(2)
    plain = np.concatenate([rng.uniform(-1, -0.2, (10, 16, 16, 1)),
                            rng.uniform(0.2, 1, (10, 16, 16, 1))]).astype(np.float32)
    augmented = plain[:, ::-1, ::-1] * 0.5  # any other images: the view the keys must come from
    data = array_task_data(plain, np.zeros(20, np.int64), augmented=augmented)
    _, new = method.after_task(spec(1, 2), trainable, state, frozen, data, jax.random.key(3))
    images = augmented if on_augmented else plain
    q = np.asarray(method.backbone.apply(frozen, images, output="cls"), np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    c = np.asarray(new["centroids"][1], np.float64)
    assign = ((q[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    for j in range(2):  # Lloyd fixed point: each key is the mean of its nearest features
        np.testing.assert_allclose(c[j], q[assign == j].mean(0), atol=1e-5)
    assert np.asarray(new["centroid_valid"]).tolist() == [[False, False], [True, True]]
    np.testing.assert_array_equal(new["centroids"][0], state["centroids"][0])


def test_weight_decay_is_torch_sgd_weight_decay_on_the_current_domain_only():
    method, frozen = micro_method(first_weight_decay=0.3, weight_decay=0.1)
    plain, _ = micro_method(first_weight_decay=0.0, weight_decay=0.0)
    trainable, state = method.init(jax.random.key(0), frozen)
    batch = {"inputs": jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (8, 16, 16, 1)),
                                  jnp.float32), "label": jnp.arange(8) % 10}
    for t, wd in ((0, 0.3), (1, 0.1)):
        g = jax.grad(lambda p: method.loss(p, state, frozen, batch, None, spec(t))[0])(trainable)
        g0 = jax.grad(lambda p: plain.loss(p, state, frozen, batch, None, spec(t))[0])(trainable)
        diff = jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b), g, g0)
        for s in ("0", "1", "2"):
            factor = wd if int(s) == t else 0.0
            np.testing.assert_allclose(diff["prompts"][s], factor * trainable["prompts"][s],
                                       atol=1e-6)
            np.testing.assert_allclose(diff["heads"][s]["kernel"],
                                       factor * trainable["heads"][s]["kernel"], atol=1e-6)
        # one compiled step for every domain (traced index): only domain t's parameters learn
        mask = jax.jit(lambda i: method.update_mask(trainable, spec(i)))(t)
        assert [float(mask["prompts"][str(s)]) for s in range(3)] == [float(s == t) for s in range(3)]
        assert float(mask["heads"][str((t + 1) % 3)]["bias"]) == 0.0
        assert float(mask["heads"][str(t)]["kernel"]) == 1.0


def test_bad_options_say_what_to_fix():
    backbone, _ = micro_backbone()
    with pytest.raises(ValueError, match="distance must be one of"):
        SPrompts(domain_config(distance="manhattan").method, backbone, 10, 2)
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_config("cddb")


def test_domainnet_trainable_parameter_count_vit_b16():
    c = load_config("domainnet")
    assert c.scenario.kind == "domain" and len(c.scenario.domains) == 6
    backbone = Backbone(vit.get_config("ViT-B/16", num_classes=0))
    method = create_method("s_prompts", c.method, backbone, 345, 6)
    trainable, state = jax.eval_shape(lambda k: method.init(k, None), jax.random.key(0))
    per_domain = 10 * 768 + (768 * 345 + 345)  # prompt tokens + linear classifier
    assert count_params(trainable) == 6 * per_domain == 1_637_910
    assert state["centroids"].shape == (6, 5, 768)


@pytest.fixture(scope="module")
def domain_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sprompts"))
    return workdir, train_and_evaluate(domain_config(), workdir)


def test_end_to_end_on_two_domains(domain_run):
    workdir, results = domain_run
    assert results["scenario"] == "domain"
    assert [len(r) for r in results["accuracy_matrix"]] == [1, 2]
    assert results["task_identity_matrix"][0] == [100.0]
    assert all(0 <= v <= 100 for row in results["task_identity_matrix"] for v in row)
    # every domain holds every class: class-IL and task-IL accuracy coincide
    np.testing.assert_allclose(results["accuracy_matrix"][-1], results["task_il_accuracy_matrix"][-1])
    assert results["trainable_params"] == 2 * (3 * 32 + 32 * 10 + 10)
    ckpt = Checkpointer(workdir)
    first, last = ckpt.restore("tasks", 0), ckpt.restore("tasks", 1)
    ckpt.close()
    for name in ("prompts", "heads"):  # domain 1's parameters untouched by domain 2
        for a, b in zip(jax.tree_util.tree_leaves(first["trainable"][name]["0"]),
                        jax.tree_util.tree_leaves(last["trainable"][name]["0"])):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first["trainable"]["prompts"]["1"], last["trainable"]["prompts"]["1"])
    assert np.asarray(last["state"]["centroid_valid"]).all()
    assert results["compilation"]["traces"] == {"train_step": 1, "eval_step": 1}
