"""RanPAC against an independent numpy computation: the random-feature Gram statistics, the
lambda chosen on a held-out split (the official ``optimise_ridge_parameter``, written out with
explicit predictions) and the ridge head; paper-configuration sizes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pecft_jax.backbones import vit
from pecft_jax.backbones.backbone import Backbone, load_backbone
from pecft_jax.methods import create_method
from pecft_jax.methods.base import count_params
from pecft_jax.methods.ranpac import OFFICIAL_RIDGES, fit_split, validation_errors

from helpers import array_task_data, class_dependent_tasks, load_experiment_config, task_spec

TASKS = [[0, 1, 2], [3, 4, 5]]


def numpy_ridge(h, y, fit, ridges):
    """The official selection, spelled out: solve on the fit rows, predict the others, mean
    squared error over all (rows x classes), first minimum."""
    g, q = h[fit].T @ h[fit], h[fit].T @ y[fit]
    errors = []
    for ridge in ridges:
        w = np.linalg.solve(g + ridge * np.eye(len(g)), q)
        errors.append(np.mean((h[~fit] @ w - y[~fit]) ** 2))
    return float(ridges[int(np.argmin(errors))]), np.asarray(errors)


@pytest.fixture(scope="module")
def micro():
    backbone, frozen = load_backbone("random:ViT-Micro/4")
    return backbone, frozen, class_dependent_tasks(TASKS, 30)


def test_head_and_lambda_equal_a_numpy_ridge_on_the_same_random_features(micro):
    backbone, frozen, data = micro
    method = create_method("ranpac", {"M": 48, "first_session": "none"}, backbone, 6, 2)
    trainable, state = method.init(jax.random.key(0), frozen)
    assert trainable == {} and state["w_rand"].shape == (32, 48)
    w_rand = np.asarray(state["w_rand"], np.float64)
    G, Q = np.zeros((48, 48)), np.zeros((48, 6))
    for t, (images, labels) in enumerate(data):
        key = jax.random.key(10 + t)
        trainable, state = method.after_task(task_spec(t, TASKS), trainable, state, frozen,
                                             array_task_data(images, labels), key)
        f = np.asarray(backbone.apply(frozen, images, output="cls"), np.float64)
        h = np.maximum(f @ w_rand, 0.0)
        y = np.eye(6)[labels]
        fit = fit_split(len(labels), 0.8, key)
        assert fit.sum() == int(0.8 * len(labels))
        ridge, errors = numpy_ridge(h, y, fit, OFFICIAL_RIDGES)
        assert 1e-8 < ridge < 1e8  # an interior choice: the grid matters here
        assert float(state["ridge"][t]) == pytest.approx(ridge)
        G, Q = G + h.T @ h, Q + h.T @ y
        # float32 device sums of features computed on a sharded batch vs float64 numpy
        np.testing.assert_allclose(state["G"], G, rtol=1e-4, atol=1e-6 * np.abs(G).max())
        np.testing.assert_allclose(state["Q"], Q, rtol=1e-4, atol=1e-6 * np.abs(Q).max())
        head = np.linalg.solve(G + ridge * np.eye(48), Q)
        np.testing.assert_allclose(state["head"], head, rtol=1e-4,
                                   atol=1e-4 * np.abs(head).max())
        # columns of classes not seen yet stay zero; logits are h @ head
        assert np.all(np.asarray(state["head"])[:, 3 * (t + 1):] == 0)
        logits = method.logits(trainable, state, frozen, {"inputs": images[:4]},
                               task_spec(t, TASKS))
        np.testing.assert_allclose(logits, h[:4] @ np.asarray(state["head"]), rtol=1e-4,
                                   atol=1e-4 * np.abs(h[:4] @ head).max())


def test_validation_errors_from_gram_statistics_equal_explicit_predictions():
    rng = np.random.default_rng(1)
    h = np.maximum(rng.normal(size=(50, 12)), 0)
    y = np.eye(4)[rng.integers(0, 4, 50)]
    fit = np.zeros(50, bool)
    fit[:40] = True
    gram = lambda rows: {"G": jnp.asarray(h[rows].T @ h[rows], jnp.float32),
                         "Q": jnp.asarray(h[rows].T @ y[rows], jnp.float32)}
    ridges = (1e-3, 1e-1, 1.0, 10.0, 1e3)
    got = validation_errors(gram(fit), gram(~fit), 10.0, jnp.asarray(ridges))
    _, want = numpy_ridge(h, y, fit, ridges)
    np.testing.assert_allclose(got, want, rtol=1e-3)


def test_a_near_singular_fit_is_never_the_chosen_lambda():
    rng = np.random.default_rng(2)
    base = np.maximum(rng.normal(size=(40, 6)), 0)
    h = 1e3 * np.concatenate([base, base], axis=1)  # duplicated columns: G_fit is singular
    y = np.eye(3)[rng.integers(0, 3, 40)]
    fit = np.arange(40) < 32
    gram = lambda rows: {"G": jnp.asarray(h[rows].T @ h[rows], jnp.float32),
                         "Q": jnp.asarray(h[rows].T @ y[rows], jnp.float32)}
    errors = np.asarray(validation_errors(gram(fit), gram(~fit), 8.0,
                                          jnp.asarray(OFFICIAL_RIDGES, jnp.float32)))
    assert not np.isnan(errors).any() and np.all(errors >= 0)
    assert np.argmin(errors) > 0 and np.isfinite(errors.min())


def test_ranpac_runs_end_to_end_on_the_loop(micro, tmp_path):
    from helpers import tiny_config
    from pecft_jax.train.loop import train_and_evaluate
    config = tiny_config("ranpac", M=64, first_session="none")
    config.scenario.num_tasks = 2
    results = train_and_evaluate(config, str(tmp_path))
    assert not any(k.startswith("train_step") for k in results["compilation"]["traces"])
    assert [len(r) for r in results["accuracy_matrix"]] == [1, 2]
    assert results["trainable_params"] == 64 * 10  # the head only: no phase 1


@pytest.mark.parametrize("arg, classes, module_params", [
    # AdaptFormer adapter, bottleneck 64, in each of the 12 blocks: down 768x64 + 64, up
    # 64x768 + 768
    ("cifar100", 100, 12 * (768 * 64 + 64 + 64 * 768 + 768)),
    # SSF at ln1, query, key, value, out, ln2, fc1 (3072 wide), fc2 of each block, and on
    # the patch embedding and the final norm (official petl/vision_transformer_ssf.py)
    ("imagenet_r", 200, 12 * 2 * (7 * 768 + 3072) + 2 * 2 * 768),
])
def test_paper_configuration_sizes(arg, classes, module_params):
    c = load_experiment_config("ranpac", arg)
    assert c.method.M == 10_000
    backbone = Backbone(vit.get_config("ViT-B/16", num_classes=0))
    method = create_method("ranpac", c.method, backbone, classes, c.scenario.num_tasks)
    trainable, state = jax.eval_shape(lambda k: method.init(k, None), jax.random.key(0))
    assert count_params(trainable["peft"]) == module_params
    assert count_params(trainable["first_head"]) == 768 * classes + 1  # cosine head + sigma
    # what is stored: G (M x M), Q and the head (M x C), W_rand (d x M)
    assert state["G"].shape == (10_000, 10_000) and state["G"].dtype == jnp.float32
    assert state["G"].size * 4 == 400_000_000  # bytes: 400 MB
    assert state["Q"].shape == state["head"].shape == (10_000, classes)
    assert state["w_rand"].shape == (768, 10_000)
    # after phase 1 the cosine head is dropped; the solved M x C head counts instead
    after = {"peft": trainable["peft"]}
    assert method.count_trainable(after, state) == module_params + 10_000 * classes
