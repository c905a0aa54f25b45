"""``transformers.AdamW`` and the run-long optimizer (``train.optimizer_scope='run'``)
against numpy ports of the official PyTorch code they reproduce."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from pecft_jax.configs import check_run_config
from pecft_jax.train import partition
from pecft_jax.train.loop import make_base_optimizer
from pecft_jax.train.optimizers import transformers_adamw
from helpers import assert_crashed_run_resumes_bit_identical, tiny_config

B1, B2, EPS, WD, LR, WARMUP = 0.9, 0.999, 1e-6, 0.01, 3e-3, 7


class NumpyTransformersAdamW:
    """``transformers.AdamW.step`` (transformers 4.20 ``optimization.py``, the class
    Progressive Prompts imports), written out in float64 for tensors given by name: a
    per-tensor step count and moments created at the tensor's first gradient, the
    bias-corrected step size, epsilon on the root of the raw second moment, then decay of
    the stepped tensor. ``lr_at(k)``: a ``LambdaLR`` stepped after every step (``k`` counts
    the optimizer's steps, whatever tensors took part)."""

    def __init__(self, lr_at, weight_decay=WD):
        self.lr_at, self.wd, self.state, self.steps = lr_at, weight_decay, {}, 0

    def step(self, params, grads):
        lr = self.lr_at(self.steps)
        for name, grad in grads.items():  # the tensors whose .grad is not None
            st = self.state.setdefault(name, {"step": 0, "m": np.zeros_like(grad),
                                              "v": np.zeros_like(grad)})
            st["step"] += 1
            st["m"] = B1 * st["m"] + (1 - B1) * grad
            st["v"] = B2 * st["v"] + (1 - B2) * grad * grad
            size = lr * np.sqrt(1 - B2 ** st["step"]) / (1 - B1 ** st["step"])
            params[name] = params[name] - size * st["m"] / (np.sqrt(st["v"]) + EPS)
            params[name] = params[name] - lr * self.wd * params[name]
        self.steps += 1


def warmup(k):  # get_constant_schedule_with_warmup: LambdaLR's factor at step k
    return LR * min(1.0, k / WARMUP)


def _train_cfg(**values):
    cfg = ml_collections.ConfigDict(dict(optimizer="transformers_adamw", learning_rate=LR,
                                         schedule="constant", warmup_steps=WARMUP, eps=EPS,
                                         weight_decay=WD))
    cfg.update(values)
    return cfg


def test_transformers_adamw_is_the_official_step():
    """Twelve steps on random gradients, through the warm-up and past it, equal the float64
    port; optax's AdamW on the same gradients does not (epsilon, decay)."""
    rng = np.random.default_rng(0)
    # parameters of 0.1: float32's rounding stays far below the tolerance
    params = {"w": 0.1 * rng.normal(size=(3, 4)), "b": 0.1 * rng.normal(size=(4,))}
    grads = [{k: 1e-4 * rng.normal(size=v.shape) for k, v in params.items()}
             for _ in range(12)]
    official = NumpyTransformersAdamW(warmup)
    expected = dict(params)
    for g in grads:
        official.step(expected, g)

    def run(opt):
        p = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
        state = opt.init(p)
        for g in grads:
            updates, state = opt.update(jax.tree_util.tree_map(jnp.float32, g), state, p)
            p = optax.apply_updates(p, updates)
        return p

    ours = run(make_base_optimizer(_train_cfg(), total_steps=12))
    for k in params:
        np.testing.assert_allclose(ours[k], expected[k], rtol=0, atol=2e-7)
    # the same schedule in optax's AdamW misses it: epsilon counts at gradients of 1e-4
    theirs = run(make_base_optimizer(_train_cfg(optimizer="adamw"), total_steps=12))
    assert max(float(np.abs(theirs[k] - expected[k]).max()) for k in params) > 1e-5
    # (the optimizer alone, as a library user builds it)
    alone = run(transformers_adamw(lambda k: LR * jnp.minimum(1.0, k / WARMUP),
                                   eps=EPS, weight_decay=WD))
    for k in params:
        np.testing.assert_allclose(alone[k], ours[k], rtol=0, atol=1e-7)


def test_transformers_adamw_decays_the_stepped_parameters():
    """At a large rate and decay the order of step and decay shows (``lr^2 wd`` times the
    step): the stepped parameters are decayed, as ``transformers.AdamW`` does, not the
    parameters before the step, as optax's AdamW does."""
    lr, wd = 0.1, 0.5
    rng = np.random.default_rng(2)
    params = {"w": 0.1 * rng.normal(size=(5,))}
    grads = [{"w": rng.normal(size=(5,))} for _ in range(3)]
    official = NumpyTransformersAdamW(lambda k: lr, weight_decay=wd)
    expected = dict(params)
    for g in grads:
        official.step(expected, g)
    before_the_step = {"w": params["w"].copy()}  # decay first, then the same Adam step
    m = v = 0.0
    for k, g in enumerate(grads, start=1):
        m, v = B1 * m + (1 - B1) * g["w"], B2 * v + (1 - B2) * g["w"] ** 2
        size = lr * np.sqrt(1 - B2 ** k) / (1 - B1 ** k)
        before_the_step["w"] = (before_the_step["w"] * (1 - lr * wd)
                                - size * m / (np.sqrt(v) + EPS))
    opt = transformers_adamw(lr, eps=EPS, weight_decay=wd)
    p = {"w": jnp.asarray(params["w"], jnp.float32)}
    state = opt.init(p)
    for g in grads:
        updates, state = opt.update({"w": jnp.asarray(g["w"], jnp.float32)}, state, p)
        p = optax.apply_updates(p, updates)
    np.testing.assert_allclose(p["w"], expected["w"], rtol=0, atol=2e-7)
    assert np.abs(before_the_step["w"] - expected["w"]).max() > 1e-3


def _official_run(prompts, heads, grads, steps_per_task):
    """Progressive Prompts' BERT code as it trains (``model_utils.py:172-177, 411-426``):
    one AdamW and one warm-up for the run; the prompts are slices of one tensor whose
    other slices get zero gradients and are restored after each step; head ``t`` is its
    own tensor, given a gradient only while task ``t`` trains."""
    opt = NumpyTransformersAdamW(warmup)
    params = {"prompts": prompts.copy(), **{f"head{t}": h.copy() for t, h in enumerate(heads)}}
    k = 0
    for t, steps in enumerate(steps_per_task):
        saved = params["prompts"].copy()
        for _ in range(steps):
            g_prompt, g_head = grads[k]
            full = np.zeros_like(params["prompts"])
            full[t] = g_prompt[t]
            opt.step(params, {"prompts": full, f"head{t}": g_head[t]})
            restored = saved.copy()
            restored[t] = params["prompts"][t]
            params["prompts"] = restored
            k += 1
    return params


def test_a_run_long_optimizer_is_the_official_one_over_the_tasks():
    """Three tasks of 5, 3 and 4 steps: per task a fresh optimizer state whose counts
    continue (``continue_counts``: every schedule's, the prompt group's Adam count) and the
    update mask of the task's slices equal the official one-optimizer run -- the warm-up
    once over the run, the new prompt's first steps without bias correction, the heads'
    with it. A fresh optimizer per task does not."""
    rng = np.random.default_rng(1)
    tasks, steps_per_task = 3, (5, 3, 4)
    prompts = 0.1 * rng.normal(size=(tasks, 2, 3))
    heads = 0.1 * rng.normal(size=(tasks, 3, 2))
    grads = [(1e-3 * rng.normal(size=prompts.shape), 1e-3 * rng.normal(size=heads.shape))
             for _ in range(sum(steps_per_task))]
    expected = _official_run(prompts, heads, grads, steps_per_task)

    def ours(run_long):
        labels = {"prompts": "prompt", "head": "train"}
        params = {"prompts": jnp.asarray(prompts, jnp.float32),
                  "head": jnp.asarray(heads, jnp.float32)}
        k = 0
        for t, steps in enumerate(steps_per_task):
            base = make_base_optimizer(_train_cfg(), total_steps=steps)
            opt = partition.make_optimizer(labels, {"prompt": base, "train": base})
            state = opt.init(params)
            if run_long:
                state = jax.jit(partition.continue_counts, static_argnums=2)(
                    state, np.int32(k), ("prompt",))
            mask = (np.arange(tasks) == t).astype(np.float32)[:, None, None]
            for _ in range(steps):
                g = {"prompts": jnp.asarray(grads[k][0] * mask, jnp.float32),
                     "head": jnp.asarray(grads[k][1] * mask, jnp.float32)}
                updates, state = opt.transform.update(g, state, params)
                updates = jax.tree_util.tree_map(lambda u: u * mask, updates)
                params = optax.apply_updates(params, updates)
                k += 1
        return params

    got = ours(run_long=True)
    np.testing.assert_allclose(got["prompts"], expected["prompts"], rtol=0, atol=2e-7)
    for t in range(tasks):
        np.testing.assert_allclose(got["head"][t], expected[f"head{t}"], rtol=0, atol=2e-7)
    fresh = ours(run_long=False)
    assert np.abs(np.asarray(fresh["prompts"]) - expected["prompts"]).max() > 1e-4


def test_continue_counts_sets_the_schedules_and_the_named_groups_adam_counts():
    labels = {"a": "prompt", "b": "train", "c": "train*0.1"}
    params = {"a": jnp.ones(2), "b": jnp.ones(3), "c": jnp.ones(1)}
    base = optax.adamw(optax.linear_schedule(0.0, 1.0, 10))
    groups = {"prompt": base, "train": base, "train*0.1": optax.chain(base, optax.scale(0.1))}
    state = partition.make_optimizer(labels, groups, clip_norm=1.0).init(params)
    moved = partition.continue_counts(state, 40, ("prompt", "train*0.1"))
    counts = {}
    for path, value in optax.tree_utils.tree_get_all_with_path(moved, "count"):
        group = next(key.key for key in path if isinstance(key, jax.tree_util.DictKey))
        counts[(group, path[-1].tuple_name)] = int(value)
    assert counts == {("prompt", "ScaleByAdamState"): 40, ("prompt", "ScaleByScheduleState"): 40,
                      ("train", "ScaleByAdamState"): 0, ("train", "ScaleByScheduleState"): 40,
                      ("train*0.1", "ScaleByAdamState"): 40,
                      ("train*0.1", "ScaleByScheduleState"): 40}
    # the moments are untouched
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(moved)):
        if a.ndim:
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"no Adam state for groups \['head'\]"):
        partition.continue_counts(state, 40, ("head",))


def test_a_run_long_optimizer_needs_a_constant_schedule():
    c = tiny_config()
    c.train.optimizer_scope = "run"
    check_run_config(c)
    c.train.schedule = "cosine"
    with pytest.raises(ValueError, match="optimizer_scope='run' with train.schedule='cosine'"):
        check_run_config(c)
    c.train.schedule, c.train.optimizer_scope = "constant", "global"
    with pytest.raises(ValueError, match="train.optimizer_scope must be 'task'"):
        check_run_config(c)
    c.train.optimizer_scope, c.train.optimizer = "task", "lamb"
    with pytest.raises(ValueError, match="train.optimizer must be one of"):
        check_run_config(c)


@pytest.mark.slow  # four 2-task runs and two crashed ones (~1 min)
@pytest.mark.parametrize("crash_after", ["task_end", "inside_task"])
def test_a_run_long_optimizer_resumes_bit_identical(crash_after, tmp_path, monkeypatch):
    """Crashed at task 1's first batch (it resumes from task 0's end: the counts start
    again from the run's steps before task 1) or after a checkpoint inside task 1 (the
    checkpointed optimizer state holds them), a run with a warm-up over the run ends as the
    uninterrupted run does."""

    def config():
        c = tiny_config()
        c.scenario.num_tasks = 2
        c.train.optimizer, c.train.weight_decay = "transformers_adamw", 0.01
        c.train.optimizer_scope, c.train.warmup_steps = "run", 40
        return c

    def crash_at(whole):
        first_task_steps = whole["train_steps"] // 2
        assert first_task_steps > 4  # task 1 checkpoints at its step 3
        return first_task_steps + (1 if crash_after == "task_end" else 5)

    assert_crashed_run_resumes_bit_identical(monkeypatch, tmp_path, config, crash_at)
