"""Progressive Prompts: the official input layout reproduced exactly, the residual
reparameterisation, and a run whose learnt tasks never change."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pecft_jax.backbones.backbone import TextBackbone, minilm_dir
from pecft_jax.methods.progressive_prompts import ProgressivePrompts, prompt_positions
from pecft_jax.train.loop import train_and_evaluate
from tests.helpers import task_checkpoints, task_spec
from tests.test_bert import MICRO_HF, _numpy_bert, batch, micro  # noqa: F401 (fixtures)
from tests.test_text import _text_config, needs_minilm, needs_wordnet

TASKS, LENGTH = 3, 4


def _method(cfg, residual_mlp):
    backbone = TextBackbone(cfg, minilm_dir(), max_length=10)  # [CLS] id 101 < 128
    return ProgressivePrompts({"prompt_length": LENGTH, "residual_mlp": residual_mlp,
                               "mlp_bottleneck": 8}, backbone, num_classes=6,
                              num_tasks=TASKS)


def _numpy_ln(x, t, name, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return ((x - mu) / np.sqrt(var + eps) * np.asarray(t[name + ".weight"], np.float64)
            + np.asarray(t[name + ".bias"], np.float64))


def test_prompt_positions_follow_the_official_counter():
    # CLU:313-324 with seq_len 9, prefix_len 4, three tasks
    np.testing.assert_array_equal(prompt_positions(9, 3, 4),
                                  [[0, 10, 11, 12], [0, 13, 14, 15], [0, 16, 17, 18]])


@needs_minilm
def test_a_pass_equals_the_official_layout_text_then_prompts(micro, batch):  # noqa: F811
    """The output read for task j equals, in a float64 numpy BERT, the official sequence
    [text without [CLS]; P_0; ...; P_j] with the official position ids, read at P_j's first
    token: prompts after a masked [CLS] in front of the text, the later tasks' prompts in the
    sequence but masked, change nothing."""
    cfg, params, tensors = micro
    ids, mask, _ = batch
    method = _method(cfg, residual_mlp=False)
    trainable, state = method.init(jax.random.key(0), params)
    assert np.array_equal(np.asarray(trainable["prompts"][:, 0]),
                          np.repeat(np.asarray(params["embeddings"]["word_embeddings"]
                                               ["embedding"])[[101]], TASKS, 0))
    for t in range(TASKS):
        _, state = method.after_task(_spec(t), trainable, state, params, None, None)
    inputs = {"token_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    tokens = jnp.broadcast_to(state["prompt_tokens"], (4,) + state["prompt_tokens"].shape)

    def p(name):
        return np.asarray(tensors["bert." + name], np.float64)
    text = ids[:, 1:]
    positions = prompt_positions(ids.shape[1] - 1, TASKS, LENGTH)
    for j in range(TASKS):
        got = np.asarray(method._encode(params, inputs, tokens, j))
        words = np.concatenate(
            [p("embeddings.word_embeddings.weight")[text]]
            + [np.broadcast_to(np.asarray(trainable["prompts"][k], np.float64), (4, LENGTH,
                                                                                 cfg.hidden_size))
               for k in range(j + 1)], axis=1)
        position_ids = np.concatenate([np.arange(1, ids.shape[1])] +
                                      [positions[k] for k in range(j + 1)])
        embeddings = (words + p("embeddings.position_embeddings.weight")[position_ids][None]
                      + p("embeddings.token_type_embeddings.weight")[0])
        official_mask = np.concatenate([mask[:, 1:], np.ones((4, LENGTH * (j + 1)))], axis=1)
        out, _, _ = _numpy_bert(tensors, MICRO_HF, np.zeros(official_mask.shape, int),
                                official_mask, prefix="bert.", embeddings=embeddings)
        want = out[:, ids.shape[1] - 1 + LENGTH * j]
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def _spec(t):
    return task_spec(t, ((0, 1), (2, 3), (4, 5)))


@needs_minilm
def test_task_ts_step_carries_the_prompts_learnt_so_far_and_no_others(micro, batch,  # noqa: F811
                                                                     monkeypatch):
    """The official sequence grows by a prompt a task: task t's loss runs P_0..P_t only
    (t + 1 prompts, as the encoder receives them), and equals the same pass with all T
    prompts present and the later ones masked out of the attention (dropout off)."""
    import dataclasses
    cfg, params, _ = micro
    cfg = dataclasses.replace(cfg, hidden_dropout=0.0, attention_dropout=0.0)
    ids, mask, _ = batch
    method = ProgressivePrompts({"prompt_length": LENGTH, "mlp_bottleneck": 8,
                                 "head_dropout": 0.0},
                                TextBackbone(cfg, minilm_dir(), max_length=10), num_classes=6,
                                num_tasks=TASKS)
    trainable, state = method.init(jax.random.key(4), params)
    trainable = jax.tree_util.tree_map(
        lambda a: a + 0.3 * jax.random.normal(jax.random.key(5), a.shape), trainable)
    _, state = method.after_task(_spec(0), trainable, state, params, None, None)
    inputs = {"token_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    labels = jnp.asarray([2, 3, 3, 2])
    seen = []
    apply = TextBackbone.apply

    def spy(self, frozen, inputs, context, **kw):
        seen.append(context.layers[0].prompt.shape[1])
        return apply(self, frozen, inputs, context, **kw)
    monkeypatch.setattr(TextBackbone, "apply", spy)
    (loss, _), grads = jax.value_and_grad(
        lambda tr: method.loss(tr, state, params, {"inputs": inputs, "label": labels},
                               jax.random.key(6), _spec(1)), has_aux=True)(trainable)
    assert seen == [2 * LENGTH]

    def masked(tr):  # every task's prompt in the sequence, prompt 2 masked out
        every = state["prompt_tokens"].at[1].set(method._current_prompt(tr, params, 1))
        every = jnp.broadcast_to(every, (4,) + every.shape)
        logits = method._head(tr["head"], method._encode(params, inputs, every, 1), 1)
        return method.masked_ce(logits, {"label": labels}, _spec(1))
    want, want_grads = jax.value_and_grad(masked)(trainable)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    for got, expected in zip(jax.tree_util.tree_leaves(grads),
                             jax.tree_util.tree_leaves(want_grads)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(grads["prompts"][1])).max() > 0


@needs_minilm
def test_the_kept_prompt_is_the_embedded_prompt_through_its_residual_mlp(micro):  # noqa: F811
    cfg, params, tensors = micro
    method = _method(cfg, residual_mlp=True)
    trainable, state = method.init(jax.random.key(1), params)
    trainable = jax.tree_util.tree_map(
        lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape), trainable)
    _, state = method.after_task(_spec(1), trainable, state, params, None, None)
    x = (np.asarray(trainable["prompts"][1], np.float64)
         + np.asarray(tensors["bert.embeddings.position_embeddings.weight"],
                      np.float64)[prompt_positions(9, TASKS, LENGTH)[1]]
         + np.asarray(tensors["bert.embeddings.token_type_embeddings.weight"], np.float64)[0])
    x = _numpy_ln(x, tensors, "bert.embeddings.LayerNorm", MICRO_HF["layer_norm_eps"])
    mlp = jax.tree_util.tree_map(lambda a: np.asarray(a[1], np.float64), trainable["mlp"])
    hidden = np.maximum(x @ mlp["down"]["kernel"] + mlp["down"]["bias"], 0.0)
    want = x + hidden @ mlp["up"]["kernel"] + mlp["up"]["bias"]
    np.testing.assert_allclose(np.asarray(state["prompt_tokens"][1]), want, atol=1e-4)
    assert not np.asarray(state["prompt_tokens"][0]).any()  # task 0 not finished: untouched


def test_image_backbones_are_refused():
    from pecft_jax.backbones.backbone import load_backbone
    backbone, _ = load_backbone("random:ViT-Micro/4")
    with pytest.raises(ValueError, match="give a text backbone"):
        ProgressivePrompts({}, backbone, num_classes=4, num_tasks=2)


@needs_wordnet
@needs_minilm
def test_learnt_tasks_never_change_under_the_official_run_long_optimizer(tmp_path,
                                                                          monkeypatch):
    """Task-incremental by construction: task 0's prompt, head and accuracy after task 1 are
    exactly what they were after task 0 -- under ``transformers_adamw``'s weight decay
    too; task 1 learnt its own prompt. With ``train.optimizer_scope='run'``, as the
    BERT-order configs run, task 1's optimizer starts with the warm-up and the prompts' Adam
    count at task 0's step count and the heads' Adam count at 0, and the logged rate
    continues the run's warm-up."""
    import json

    import optax

    from pecft_jax.train.loop import ContinualTrainer

    c = _text_config("progressive_prompts")
    c.scenario.num_tasks = 2
    c.train.epochs = 3
    c.train.optimizer, c.train.optimizer_scope = "transformers_adamw", "run"
    c.train.weight_decay, c.train.eps, c.train.learning_rate = 0.01, 1e-6, 1e-2
    c.train.warmup_steps, c.train.log_every_steps = 50, 1
    starts = []
    initial = ContinualTrainer.initial_optimizer_state

    def recorded(self, *args, **kwargs):
        state = initial(self, *args, **kwargs)
        counts = {}
        for path, value in optax.tree_utils.tree_get_all_with_path(state, "count"):
            group = next(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
            counts[(group, path[-1].tuple_name)] = int(value)
        starts.append(counts)
        return state

    monkeypatch.setattr(ContinualTrainer, "initial_optimizer_state", recorded)
    results = train_and_evaluate(c, str(tmp_path))
    task_il = results["task_il_accuracy_matrix"]
    assert task_il[1][0] == task_il[0][0]
    # one train, one pass and one eval program per task: the sequence grows by a prompt
    # each task; the eval step reads the passes' outputs, each (test set, pass) computed once
    assert results["compilation"]["traces"] == {
        "train_step/0": 1, "train_step/1": 1, "task_features/0": 1, "task_features/1": 1,
        "eval_step/0": 1, "eval_step/1": 1}
    first, second = task_checkpoints(tmp_path, [0, 1], "trainable")
    np.testing.assert_array_equal(second["prompts"][0], first["prompts"][0])
    assert not np.array_equal(second["prompts"][1], first["prompts"][1])
    np.testing.assert_array_equal(second["head"]["hidden"]["kernel"][0],
                                  first["head"]["hidden"]["kernel"][0])
    np.testing.assert_array_equal(second["mlp"]["down"]["kernel"][0],
                                  first["mlp"]["down"]["kernel"][0])

    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    rates = [(r["task"], r["step"], r["train/learning_rate"]) for r in logged
             if "train/learning_rate" in r]
    steps0 = max(step for task, step, _ in rates if task == 0)  # task 0's updates
    assert steps0 > 1 and len(starts) == 2
    adam, schedule = "ScaleByAdamState", "ScaleByScheduleState"
    assert starts[0] == {("prompt", adam): 0, ("prompt", schedule): 0,
                         ("train", adam): 0, ("train", schedule): 0}
    assert starts[1] == {("prompt", adam): steps0, ("prompt", schedule): steps0,
                         ("train", adam): 0, ("train", schedule): steps0}
    # the rate of the run's update k (1-based) is 1e-2 * (k - 1) / 50, in task 1 too
    np.testing.assert_allclose([r for _, _, r in rates],
                               [1e-2 * (step - 1) / 50 for _, step, _ in rates], rtol=1e-6)


@needs_minilm
def test_shared_classes_are_scored_by_the_latest_task(micro, batch):  # noqa: F811
    """Domain-incremental (every task teaches classes 0 and 1): after task t the logits are
    head t's with prompts 0..t -- never an unlearnt task's zeros."""
    cfg, params, _ = micro
    ids, mask, _ = batch
    method = ProgressivePrompts({"prompt_length": LENGTH, "residual_mlp": False},
                                TextBackbone(cfg, minilm_dir(), max_length=10), num_classes=2,
                                num_tasks=TASKS)
    trainable, state = method.init(jax.random.key(3), params)
    spec = task_spec(0, ((0, 1),) * TASKS)
    inputs = {"token_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    for t in range(TASKS):
        spec = task_spec(t, ((0, 1),) * TASKS)
        _, state = method.after_task(spec, trainable, state, params, None, None)
        got = np.asarray(method.logits(trainable, state, params, {"inputs": inputs}, spec))
        tokens = jnp.broadcast_to(state["prompt_tokens"], (4,) + state["prompt_tokens"].shape)
        want = np.asarray(method._head(trainable["head"],
                                       method._encode(params, inputs, tokens, t), t))
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert np.abs(got).max() > 0


def _after_two_tasks(micro, batch):  # noqa: F811
    """``(method, trainable, state, inputs)``: three tasks of classes (0, 1), (2, 3), (4, 5),
    random non-zero trainables, tasks 0 and 1 learnt (their prompts kept), the batch's texts."""
    cfg, params, _ = micro
    ids, mask, _ = batch
    method = _method(cfg, residual_mlp=False)
    trainable, state = method.init(jax.random.key(7), params)
    trainable = jax.tree_util.tree_map(
        lambda a: a + 0.3 * jax.random.normal(jax.random.key(8), a.shape), trainable)
    for t in range(2):
        _, state = method.after_task(_spec(t), trainable, state, params, None, None)
    inputs = {"token_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    return method, trainable, state, inputs


@needs_minilm
def test_class_il_logits_score_each_tasks_classes_by_its_head_and_prompts(  # noqa: F811
        micro, batch):  # noqa: F811
    """Class-incremental, after task 1 of 3: task j's columns are head j's logits of the
    pass with prompts 0..j (prompt 1 masked out of task 0's pass), task 2's columns 0."""
    _, params, _ = micro
    method, trainable, state, inputs = _after_two_tasks(micro, batch)
    got = np.asarray(method.logits(trainable, state, params, {"inputs": inputs}, _spec(1)))
    prompts = state["prompt_tokens"][:2]
    tokens = jnp.broadcast_to(prompts, (4,) + prompts.shape)
    for j, classes in enumerate(((0, 1), (2, 3))):
        prompts = tokens if j == 1 else tokens[:, :1]  # task 0's pass: its prompt alone
        want = np.asarray(method._head(trainable["head"],
                                       method._encode(params, inputs, prompts, j), j))
        np.testing.assert_allclose(got[:, classes], want[:, classes], atol=1e-5)
    assert not got[:, 4:].any()


@needs_minilm
def test_logits_read_each_tasks_pass_from_the_cached_task_features(micro, batch):  # noqa: F811
    """Pass j's cached features are what the official evaluation computes for task j
    (prompts 0..j, nothing after them in the sequence); after task 1 of 3 the logits from
    them equal those that run the passes, and come from the batch alone (no text)."""
    from pecft_jax.methods.common import TASK_FEATURES
    cfg, params, _ = micro
    method, trainable, state, inputs = _after_two_tasks(micro, batch)
    assert method.task_features_fixed
    assert method.scored_passes(_spec(1)) == (0, 1)
    features = np.zeros((4, TASKS, cfg.hidden_size), np.float32)
    both = jnp.broadcast_to(state["prompt_tokens"][:2], (4, 2) + state["prompt_tokens"].shape[1:])
    for j in range(2):
        features[:, j] = method.task_features(trainable, state, params, inputs, _spec(j))
        # the same output as in a sequence of prompts 0 and 1, the later masked out
        np.testing.assert_allclose(features[:, j], method._encode(params, inputs, both, j),
                                   atol=1e-5)
    plain = np.asarray(method.logits(trainable, state, params, {"inputs": inputs}, _spec(1)))
    cached = np.asarray(method.logits(trainable, state, params,
                                      {TASK_FEATURES: jnp.asarray(features)}, _spec(1)))
    np.testing.assert_allclose(cached, plain, atol=1e-5)
    assert np.abs(plain[:, :4]).min() > 0 and not plain[:, 4:].any()
    other = np.asarray(method.logits(trainable, state, params,
                                     {TASK_FEATURES: jnp.asarray(features[::-1])}, _spec(1)))
    assert np.abs(other - plain).max() > 1e-3  # read from the batch, not recomputed


def test_only_the_passes_that_score_a_class_are_cached():
    """Class-incremental: every learnt task's head scores its classes. Domain-incremental
    (every task teaches the same classes): the latest task's alone, so the loop computes
    one pass per test set and evaluation, as without the cache."""
    method = ProgressivePrompts.__new__(ProgressivePrompts)
    method.num_classes = 6
    assert method.scored_passes(_spec(2)) == (0, 1, 2)
    assert method.scored_passes(task_spec(2, ((0, 1),) * TASKS)) == (2,)
    assert method.scored_passes(task_spec(1, ((0, 1), (1, 2), (3,)))) == (0, 1)
