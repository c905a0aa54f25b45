"""HiDe-Prompt: its pieces vs numpy, its after-task statistics and heads, end to end."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pecft_jax.backbones import vit
from pecft_jax.backbones.backbone import Backbone, load_backbone
from pecft_jax.methods import create_method
from pecft_jax.methods import statistics as S
from pecft_jax.methods.hide_prompt import (HiDePrompt, apply_tii_head, contrastive_regularizer,
                                           init_tii_head)
from pecft_jax.peft.prompts import prefix_context
from pecft_jax.train.checkpoint import Checkpointer
from pecft_jax.train.compilation import CompileMonitor
from pecft_jax.methods.base import count_params
from pecft_jax.train.loop import train_and_evaluate

from helpers import (array_task_data, first_gradient_step, load_experiment_config,
                     task_spec, tiny_config)


def load_config(arg):
    return load_experiment_config("hide_prompt", arg)


def tiny_hide(**overrides):
    options = dict(prompt_layers=[0, 1], prompt_length=2, tii_epochs=3, tii_batch_size=16,
                   tii_lr=1e-3, tii_align_epochs=2, tii_align_samples=8, tii_align_lr=0.01,
                   tap_epochs=2, tap_samples=8, tap_lr=0.01)
    options.update(overrides)
    return tiny_config("hide_prompt", **options)


def spec(index, task_classes, num_classes=6):
    return task_spec(index, task_classes, num_classes)


# --------------------------------------------------------------------------- pieces
def numpy_contrastive(features, prototypes, temperature):
    """The official orth_loss: CE of (M M^T / tau) rows against their own index."""
    m = np.concatenate([prototypes, features]).astype(np.float64)
    s = m @ m.T / temperature
    s = s - s.max(1, keepdims=True)
    log_softmax = s - np.log(np.exp(s).sum(1, keepdims=True))
    return -np.mean(np.diag(log_softmax))


def test_contrastive_regulariser_matches_the_official_formula():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((6, 5)).astype(np.float32)
    protos = rng.standard_normal((4, 5)).astype(np.float32)
    valid = np.array([True, False, True, False])
    got = contrastive_regularizer(jnp.asarray(feats), jnp.asarray(protos), jnp.asarray(valid), 0.8)
    np.testing.assert_allclose(got, numpy_contrastive(feats, protos[valid], 0.8), rtol=1e-5)
    # no stored prototypes (task 1): instance discrimination within the batch
    none = contrastive_regularizer(jnp.asarray(feats), jnp.asarray(protos),
                                   jnp.zeros(4, bool), 0.8)
    np.testing.assert_allclose(none, numpy_contrastive(feats, protos[:0], 0.8), rtol=1e-5)
    # gradients reach the features (matching finite differences), never the prototypes
    g_f, g_p = jax.grad(contrastive_regularizer, argnums=(0, 1))(
        jnp.asarray(feats), jnp.asarray(protos), jnp.asarray(valid), 0.8)
    assert np.all(np.asarray(g_p) == 0)
    eps = 1e-3
    for i, j in [(0, 0), (3, 2), (5, 4)]:
        hi, lo = feats.astype(np.float64).copy(), feats.astype(np.float64).copy()
        hi[i, j] += eps
        lo[i, j] -= eps
        numeric = (numpy_contrastive(hi, protos[valid], 0.8)
                   - numpy_contrastive(lo, protos[valid], 0.8)) / (2 * eps)
        np.testing.assert_allclose(g_f[i, j], numeric, rtol=2e-2, atol=1e-3)


def test_contrastive_term_per_official_gpu_share():
    """contrastive_group=3: the loss's regulariser is the mean of the official formula over
    rows 0-2 and rows 3-5 of the batch (each GPU's share; DDP averages them), not the
    formula over all six rows, which is what the default (0) computes; a train batch that
    is not a multiple of 3 is refused (the trainer's check of what the method asks), the
    eval batch left free."""
    # the features are LayerNorm outputs of squared norm 32 (the width): at a temperature of
    # that order the term is far from 0 (at the paper's 0.8 it is ~1e-6)
    t = 50.0
    grouped, frozen = micro_method(contrastive_group=3, contrastive_temperature=t)
    whole, _ = micro_method(contrastive_temperature=t)
    assert grouped.batch_groups == {"train.batch_size": (3, "method.contrastive_group")}
    assert whole.batch_groups == {}
    from pecft_jax.train.loop import check_batch_groups
    with pytest.raises(ValueError, match=r"train.batch_size=32 .*contrastive_group=3"):
        check_batch_groups(grouped, {"train.batch_size": 32, "eval.batch_size": 64})
    check_batch_groups(grouped, {"train.batch_size": 30, "eval.batch_size": 64})
    trainable, state = grouped.init(jax.random.key(0), frozen)
    cfg = grouped.backbone.config
    images = jax.random.normal(jax.random.key(1), (6, cfg.image_size, cfg.image_size,
                                                   cfg.num_channels))
    batch = {"inputs": images, "label": jnp.array([0, 1, 0, 1, 1, 0])}
    task = spec(0, [[0, 1], [2, 3], [4, 5]])
    features = np.asarray(grouped._prompted_cls(frozen, images,
                                                grouped._training_prompt(trainable, task)))
    none = features[:0]  # task 0: no stored prototypes
    for method, want in ((grouped, np.mean([numpy_contrastive(features[:3], none, t),
                                            numpy_contrastive(features[3:], none, t)])),
                         (whole, numpy_contrastive(features, none, t))):
        assert want > 0.1
        _, aux = method.loss(trainable, state, frozen, batch, jax.random.key(2), task)
        np.testing.assert_allclose(aux["metrics"]["contrastive"], want, rtol=1e-5)


def test_tii_head_is_the_official_mlp_mapping():
    params = init_tii_head(jax.random.key(0), 4, 3, hidden=(2,))
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    p = jax.tree_util.tree_map(np.asarray, params)
    erf = np.vectorize(math.erf)
    h = x @ p["mlp"]["fc0"]["kernel"] + p["mlp"]["fc0"]["bias"]
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))  # exact GELU
    h = h @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"] + x  # residual
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
    expected = h @ p["head"]["kernel"] + p["head"]["bias"]
    np.testing.assert_allclose(apply_tii_head(params, jnp.asarray(x)), expected, rtol=1e-4,
                               atol=1e-5)
    assert p["mlp"]["fc0"]["kernel"].shape == (4, 8) and p["mlp"]["fc1"]["kernel"].shape == (8, 4)


@functools.lru_cache(maxsize=1)
def micro_backbone():
    return load_backbone("random:ViT-Micro/4", seed=0)


def micro_method(**options):
    backbone, frozen = micro_backbone()
    c = tiny_hide(**options).method
    return HiDePrompt(c, backbone, 6, 3), frozen


def test_prompt_momentum_and_the_next_tasks_starting_prompt():
    method, frozen = micro_method(prompt_momentum=0.25)
    trainable, state = method.init(jax.random.key(0), frozen)
    raw = {t: {l: np.asarray(v, np.float64) for l, v in trainable["prompts"][str(t)].items()}
           for t in range(3)}
    eff = method.effective_prompts(trainable["prompts"], 2)
    e0 = raw[0]["0"]
    e1 = 0.75 * raw[1]["0"] + 0.25 * e0
    e2 = 0.75 * raw[2]["0"] + 0.25 * (e0 + e1) / 2
    for got, want in zip(eff, (e0, e1, e2)):
        np.testing.assert_allclose(got["0"], want, rtol=1e-5, atol=1e-6)
    monitor = CompileMonitor()
    new, _ = method.before_task(spec(2, [[0, 1], [2, 3], [4, 5]]), trainable, state, frozen, None,
                                jax.random.key(1))
    # computed on the host (nothing compiled), to the bit what eager jnp computes
    assert monitor.report()["xla_compilations"] == 0
    for layer in ("0", "1"):
        np.testing.assert_array_equal(new["prompts"]["2"][layer], eff[1][layer])
    labels = method.param_labels(new, spec(2, [[0, 1], [2, 3], [4, 5]]))
    assert labels["prompts"]["2"]["0"] == "prompt" and labels["head"]["kernel"] == "head"
    # one compiled step for every task: only the current task's prompt learns (traced index)
    mask = jax.jit(lambda t: method.update_mask(new, spec(t, [[0, 1], [2, 3], [4, 5]])))(2)
    assert [float(mask["prompts"][str(s)]["0"]) for s in range(3)] == [0.0, 0.0, 1.0]
    assert float(mask["head"]["kernel"]) == 1.0


@pytest.mark.parametrize("momentum", [0.0, 0.25])
def test_training_prompt_with_a_traced_task_index_is_the_python_indexed_one(momentum):
    method, frozen = micro_method(prompt_momentum=momentum)
    trainable, _ = method.init(jax.random.key(0), frozen)
    tasks = [[0, 1], [2, 3], [4, 5]]
    traced = jax.jit(lambda tr, t: method._training_prompt(tr, spec(t, tasks)))
    for t in range(3):
        eff = method.effective_prompts(trainable["prompts"], t)[t]
        got = traced(trainable, t)
        for layer in eff:  # the training prompt is E_t (the mean of earlier ones a constant)
            np.testing.assert_allclose(got[layer], eff[layer], rtol=1e-6, atol=1e-7)
    # the gradient reaches task t's prompt only, scaled by (1 - m) for t > 0
    grads = jax.grad(lambda tr: sum(jnp.sum(v) for v in method._training_prompt(
        tr, spec(jnp.int32(2), tasks)).values()))(trainable)
    np.testing.assert_allclose(grads["prompts"]["2"]["0"], 1.0 - momentum, rtol=1e-6)
    assert not np.any(np.asarray(grads["prompts"]["1"]["0"]))


def test_after_task_stores_the_statistics_of_both_representations():
    method, frozen = micro_method()
    trainable, state = method.init(jax.random.key(0), frozen)
    rng = np.random.default_rng(3)
    images = rng.uniform(-1, 1, (24, 16, 16, 1)).astype(np.float32)
    labels = np.repeat([0, 1], 12)
    task = spec(0, [[0, 1], [2, 3], [4, 5]])
    data = array_task_data(images, labels)
    _, new_state = method.after_task(task, trainable, state, frozen, data, jax.random.key(1))
    prompt_0 = method.effective_prompts(trainable["prompts"], 0)[0]
    prompted = np.asarray(method.backbone.apply(frozen, images, prefix_context(prompt_0),
                                                output="cls"), np.float64)
    plain = np.asarray(method.backbone.apply(frozen, images, output="cls"), np.float64)
    for key, feats in (("tap_stats", prompted), ("tii_stats", plain)):
        st = jax.device_get(new_state[key])
        for c in (0, 1):
            np.testing.assert_allclose(st["mean"][c], feats[labels == c].mean(0), atol=1e-4)
            np.testing.assert_allclose(st["cov"][c], np.cov(feats[labels == c], rowvar=False),
                                       atol=1e-4)
        assert np.all(st["count"][2:] == 0)
    # the prompted and the frozen representation are different things
    assert not np.allclose(prompted, plain, atol=1e-3)
    # after the first task the TAP head is the WTP head (nothing to align yet); TII trained
    np.testing.assert_array_equal(new_state["head"]["kernel"], trainable["head"]["kernel"])
    assert not np.array_equal(new_state["tii"]["head"]["kernel"], state["tii"]["head"]["kernel"])


def test_tii_trains_on_a_fresh_augmentation_every_epoch():
    """``tii_features='augmented'`` (the official TII run's train loader): epoch e of the
    TII fit trains on the frozen features of the e-th augmented view of the task's images
    -- the fit run by epoch on those features computed here; 'plain', or a run that does
    not augment, trains every epoch on the un-augmented features (one pass)."""
    epochs = 3
    method, frozen = micro_method(tii_epochs=epochs)
    _, state = method.init(jax.random.key(0), frozen)
    rng = np.random.default_rng(5)
    images = rng.uniform(-1, 1, (24, 16, 16, 1)).astype(np.float32)
    labels = np.repeat([0, 1], 12)
    view = lambda e: np.roll(images, e + 1, axis=2)  # a stand-in for a random crop
    task = spec(0, [[0, 1], [2, 3], [4, 5]])
    features = lambda x: np.asarray(method.backbone.apply(frozen, x, output="cls"))
    plain_features = features(images)
    key = jax.random.key(5)
    seen = []
    data = array_task_data(images, labels, augmented=lambda e: (seen.append(e), view(e))[1])
    got = method.fit_tii(state["tii"], plain_features, labels, task, key, data=data,
                         frozen=frozen)
    assert seen == list(range(epochs))
    fit = method._tii_fits[min(method.config.tii_batch_size, len(images))]
    valid = np.ones(len(images), bool)
    by_epoch = [features(view(e)) for e in range(epochs)]
    options = dict(steps_per_epoch=len(images) // fit.batch_size, available=len(images),
                   class_mask=task.class_mask("task"))
    want, _ = fit.by_epoch(state["tii"], key, lambda e: (by_epoch[e], labels, valid), **options)
    plain, _ = fit(state["tii"], key, (plain_features, labels, valid), **options)
    leaves = lambda tree: [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
    for a, b in zip(leaves(got), leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not all(np.allclose(a, b, atol=1e-4) for a, b in zip(leaves(got), leaves(plain)))

    for method, data in ((micro_method(tii_epochs=epochs, tii_features="plain")[0],
                          array_task_data(images, labels, augmented=lambda e: view(e))),
                         (method, array_task_data(images, labels))):  # nothing augments
        again = method.fit_tii(state["tii"], plain_features, labels, task, key, data=data,
                               frozen=frozen)
        for a, b in zip(leaves(again), leaves(plain)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("drop_last, steps", [(True, 2), (False, 3)])
def test_tii_keeps_an_epochs_last_partial_batch_unless_it_drops_it(drop_last, steps,
                                                                     monkeypatch):
    """24 features in batches of 10: 2 full batches, and the partial third one of 4 that the
    official TII loader keeps (``tii_drop_last=False``; the fit takes its mean over its own
    rows: test_statistics.py)."""
    method, frozen = micro_method(tii_epochs=1, tii_batch_size=10, tii_drop_last=drop_last)
    _, state = method.init(jax.random.key(0), frozen)
    images = np.random.default_rng(6).uniform(-1, 1, (24, 16, 16, 1)).astype(np.float32)
    labels = np.repeat([0, 1], 12)
    calls, by_epoch = [], S.ClassifierFit.by_epoch
    monkeypatch.setattr(S.ClassifierFit, "by_epoch", lambda self, *a, **kw: (
        calls.append((kw["steps_per_epoch"], self.drop_last)), by_epoch(self, *a, **kw))[1])
    features = np.asarray(method.backbone.apply(frozen, images, output="cls"))
    got = method.fit_tii(state["tii"], features, labels, spec(0, [[0, 1], [2, 3]]),
                         jax.random.key(5))
    assert calls == [(steps, drop_last)]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(got))


@pytest.mark.parametrize("mode", ["covariance", "multi_centroid"])
def test_tii_and_tap_heads_learn_from_sampled_statistics(mode):
    method, frozen = micro_method(statistics=mode, n_centroids=2)
    dim = method.backbone.feature_dim
    rng = np.random.default_rng(4)
    centres = 2.0 * rng.standard_normal((6, dim))
    feats = np.concatenate([centres[c] + 0.3 * rng.standard_normal((40, dim)) for c in range(6)])
    labels = np.repeat(np.arange(6), 40)
    stats = S.update_statistics(S.empty_statistics(6, dim, mode, n_centroids=2), feats, labels,
                                range(6))
    task = spec(2, [[0, 1], [2, 3], [4, 5]])
    test_x = np.concatenate([centres[c] + 0.3 * rng.standard_normal((20, dim)) for c in range(6)])
    test_y = np.repeat(np.arange(6), 20)
    for init, apply_fn in (
            (init_tii_head(jax.random.key(0), dim, 6), apply_tii_head),  # TII: MLP head
            (init_tii_head(jax.random.key(0), dim, 6, hidden=())["head"],  # TAP: linear head
             lambda p, f: f @ p["kernel"] + p["bias"])):
        accuracy = lambda p: np.mean(np.argmax(np.asarray(apply_fn(p, test_x)), -1) == test_y)
        fit = method._alignment(apply_fn, lr=0.05, epochs=10, samples=32)
        params = method.align(fit, init, stats, task, jax.random.key(1), steps=4)
        assert accuracy(params) > 0.95 and accuracy(params) > accuracy(init)


def test_bad_configs_say_what_to_fix():
    backbone, _ = micro_backbone()
    with pytest.raises(ValueError, match="prompt_layers"):
        HiDePrompt(tiny_hide(prompt_layers=[0, 5]).method, backbone, 6, 3)
    with pytest.raises(ValueError, match="statistics must be one of"):
        HiDePrompt(tiny_hide(statistics="full").method, backbone, 6, 3)
    with pytest.raises(ValueError, match="tii_features must be 'augmented'"):
        HiDePrompt(tiny_hide(tii_features="cached").method, backbone, 6, 3)


# --------------------------------------------------------------- paper parameter counts
@pytest.mark.parametrize("arg, classes, length", [("cifar100", 100, 5), ("imagenet_r", 200, 20)])
def test_paper_trainable_parameter_counts_vit_b16(arg, classes, length):
    c = load_config(arg)
    backbone = Backbone(vit.get_config("ViT-B/16", num_classes=0))
    method = create_method("hide_prompt", c.method, backbone, classes, c.scenario.num_tasks)
    trainable, state = jax.eval_shape(lambda k: method.init(k, None), jax.random.key(0))
    d = 768
    prompts = 10 * 5 * 2 * length * d  # 10 tasks x blocks 0-4 x (key, value) x length x D
    head = d * classes + classes
    tii = (d * 2 * d + 2 * d) + (2 * d * d + d) + 2 * d + (d * classes + classes)
    assert count_params(trainable) == prompts + head
    assert method.count_trainable(trainable, state) == prompts + head + tii
    expected = {"cifar100": 2_900_936, "imagenet_r": 4_206_736}[arg]
    assert prompts + head + tii == expected
    # stored statistics, the official scripts' multi-centroid: per class 10 clusters, each
    # a mean and a diagonal variance, for both representations
    assert state["tap_stats"]["var"].shape == (classes, 10, d)
    assert state["tii_stats"]["mean"].shape == (classes, 10, d)


# ------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def hide_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("hide"))
    c = tiny_hide()
    c.scenario.num_tasks = 2
    c.train.checkpoint_every_steps = 0
    return workdir, train_and_evaluate(c, workdir)


def test_end_to_end_records_task_identity_and_counts(hide_run):
    _, results = hide_run
    assert [len(r) for r in results["accuracy_matrix"]] == [1, 2]
    assert [len(r) for r in results["task_identity_matrix"]] == [1, 2]
    assert results["task_identity_matrix"][0] == [100.0]  # one task: always right
    assert all(0 <= v <= 100 for row in results["accuracy_matrix"] for v in row)
    d, classes, n_tasks = 32, 10, 2
    expected = (n_tasks * 2 * 2 * 2 * d + d * classes + classes          # prompts, head
                + (d * 2 * d + 2 * d) + (2 * d * d + d) + 2 * d + d * classes + classes)  # TII
    assert results["trainable_params"] == expected
    # one train and one eval step for both tasks (the task index is traced)
    assert results["compilation"]["traces"] == {"train_step": 1, "eval_step": 1}


def test_earlier_prompts_are_bit_identical_after_later_tasks(hide_run):
    workdir, _ = hide_run
    ckpt = Checkpointer(workdir)
    first, last = ckpt.restore("tasks", 0), ckpt.restore("tasks", 1)
    ckpt.close()
    for layer in ("0", "1"):
        np.testing.assert_array_equal(first["trainable"]["prompts"]["0"][layer],
                                      last["trainable"]["prompts"]["0"][layer])
        assert not np.array_equal(first["trainable"]["prompts"]["1"][layer],
                                  last["trainable"]["prompts"]["1"][layer])
    # after task 2 the statistics cover both tasks' classes
    # (remapped labels: task 1 owns classes 0-4, task 2 classes 5-9)
    first_counts = np.asarray(first["state"]["tap_stats"]["count"])
    assert np.all(first_counts[:5] > 0) and np.all(first_counts[5:] == 0)
    assert np.all(np.asarray(last["state"]["tap_stats"]["count"]) > 0)


def test_the_steps_get_the_tap_means_but_no_covariance():
    method, frozen = micro_method()
    _, state = method.init(jax.random.key(0), frozen)
    stepped = method.step_state(state)
    assert "tii_stats" not in stepped and set(stepped["tap_stats"]) == {"mean", "count"}
    assert set(stepped) == set(state) - {"tii_stats"}  # the heads, the TAP means stay
    # what a step returns is merged back without losing the statistics it never saw
    from pecft_jax.methods.base import merge_state
    changed = dict(stepped, tap_stats=dict(stepped["tap_stats"], count=stepped["tap_stats"]
                                           ["count"] + 1))
    merged = merge_state(state, changed)
    assert merged["tap_stats"]["cov"] is state["tap_stats"]["cov"]
    assert merged["tii_stats"] is state["tii_stats"]
    np.testing.assert_array_equal(merged["tap_stats"]["count"],
                                  np.asarray(state["tap_stats"]["count"]) + 1)


@pytest.mark.parametrize("mode, expected", [("covariance", 472_474_400),
                                            ("variance", 1_229_600),
                                            ("multi_centroid", 12_296_000)])
def test_statistics_memory_of_cifar100_on_vit_b(mode, expected):
    """README's table: TII + TAP statistics, 100 classes, ViT-B (768), float32, K=10."""
    shapes = S.statistics_shapes(100, 768, mode, n_centroids=10)
    one = sum(4 * math.prod(shape) for shape in shapes.values())
    assert 2 * one == expected


def test_the_loops_clipping_takes_one_norm_over_prompts_and_head(tmp_path):
    """``train.grad_clip_norm`` (1.0 in every HiDe-Prompt config) scales the prompts' and the
    head's gradients by one norm over both -- the official engine's
    ``clip_grad_norm_(model.parameters(), max_norm)`` -- before the head's tenth of the
    rate. SGD at rate 1 makes the update the clipped gradient itself."""
    config = tiny_hide()
    config.train.optimizer = "sgd"
    config.train.learning_rate = 1.0
    config.train.grad_clip_norm = 1e-3  # far below the gradients' norm: always clipping
    step = first_gradient_step(config, tmp_path)
    grads, updates = step.grads, step.updates
    norm = lambda tree: math.sqrt(sum(float(np.sum(np.square(np.asarray(x))))
                                      for x in jax.tree_util.tree_leaves(tree)))
    total = math.hypot(norm(grads["prompts"]), norm(grads["head"]))
    assert norm(grads["prompts"]) > 0 and norm(grads["head"]) > 0 and total > 1e-2
    scale = 1e-3 / total
    for got, g in zip(jax.tree_util.tree_leaves(updates["prompts"]),
                      jax.tree_util.tree_leaves(grads["prompts"])):
        np.testing.assert_allclose(got, -scale * np.asarray(g), rtol=1e-4, atol=1e-12)
    head_rate = step.method.config.head_lr_scale
    for got, g in zip(jax.tree_util.tree_leaves(updates["head"]),
                      jax.tree_util.tree_leaves(grads["head"])):
        np.testing.assert_allclose(got, -head_rate * scale * np.asarray(g), rtol=1e-4,
                                   atol=1e-12)
