"""An epoch's last partial batch, kept (``train.drop_last=False``) as PyTorch's DataLoader
keeps it: padded to the batch size and masked, it must train exactly as the partial batch
itself would -- every method's loss, gradients, metrics and state."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pecft_jax.backbones import bert
from pecft_jax.data import pipeline
from pecft_jax.data.sources import ArraySource
from pecft_jax.methods import progressive_prompts
from pecft_jax.train.loop import ContinualTrainer, train_and_evaluate

from helpers import assert_crashed_run_resumes_bit_identical, tiny_config
from tests.test_text import _text_config, needs_minilm, needs_wordnet

# tiny settings of each method (as its own tests use them); vote and contrastive groups of 4
# so that the partial batch of REAL rows splits into whole groups
METHODS = {
    "l2p": dict(batchwise_prompt=True, batchwise_group=4),
    "dualprompt": dict(g_layers=(0,), e_layers=(1,)),
    "coda_prompt": dict(pool_size=10, prompt_length=4, layers=(0, 1)),
    "hide_prompt": dict(prompt_layers=[0, 1], prompt_length=2, contrastive_group=4),
    "s_prompts": dict(prompt_length=3, num_centroids=2),
    "finetune": {},
    "slca": {},
    "ssiat": dict(adapter={"bottleneck_dim": 4}),
    "ease": dict(adapter={"bottleneck_dim": 4}),
    "lae": dict(layers=(0, 1)),
    "inflora": dict(rank=2, lamb=0.9),
    "sd_lora": dict(rank=2),
    "o_lora": dict(rank=2),
    "ranpac": dict(M=32, first_session="adapter", adapter={"bottleneck_dim": 4}),
    "aper": dict(adapter={"bottleneck_dim": 4}),
}
BATCH, REAL = 32, 12  # 12 real rows: the padding repeats them unevenly (12 + 12 + 8)


def _padded(full, real, size):
    """The pipeline's padding of a partial batch: its own rows again, masked out."""
    rows = np.resize(np.arange(real), size)
    padded = jax.tree_util.tree_map(lambda v: np.asarray(v)[rows], full)
    padded["mask"] = (np.arange(size) < real).astype(np.float32)
    return padded


def _gradient_function(trainer):
    """``batch -> (grads, aux)`` of task 0's first step (jitted: one compilation a batch
    shape, where eager operations would each compile per shape); HiDe-Prompt's contrastive
    term with stored prototypes of two classes too, as in a later task."""
    spec = trainer.task_spec(0)
    trainable, state = trainer.method.init(jax.random.key(0), trainer.frozen)
    if "tap_stats" in state:
        tap = dict(state["tap_stats"])
        mean, count = np.array(tap["mean"]), np.array(tap["count"])
        mean[:2] = np.random.default_rng(0).standard_normal(mean[:2].shape)
        count[:2] = 5
        state = dict(state, tap_stats=dict(tap, mean=mean, count=count))
    optimizer = trainer.optimizer(spec, trainable, trainer.tasks[0], 1)
    step = jax.jit(lambda batch: trainer.method.gradients(
        trainable, state, trainer.frozen, batch, jax.random.key(1), spec, optimizer))
    return lambda batch: step(jax.tree_util.tree_map(jnp.asarray, batch))


def _assert_padding_trains_as_the_real_rows(trainer, batch_size, real):
    """The first ``batch_size`` rows of task 0, cut to ``real``: the padded, masked batch
    gives the loss, gradients, metrics and state of the ``real`` rows alone."""
    first = next(iter(trainer.task_data(trainer.tasks[0])._batches()))
    assert np.all(first["mask"][:batch_size] == 1)
    full = jax.tree_util.tree_map(lambda v: np.asarray(v)[:batch_size],
                                  {k: v for k, v in first.items() if k != "mask"})
    partial = jax.tree_util.tree_map(lambda v: np.asarray(v)[:real], full)
    gradients = _gradient_function(trainer)
    want_grads, want = gradients(partial)
    got_grads, got = gradients(_padded(full, real, batch_size))
    # the padding is not ignored by accident: unmasked, it moves the gradients
    unmasked = {k: v for k, v in _padded(full, real, batch_size).items() if k != "mask"}
    plain_grads, _ = gradients(unmasked)
    close = dict(rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(got["loss"], want["loss"], **close)
    assert not all(np.allclose(a, b, **close) for a, b in zip(
        jax.tree_util.tree_leaves(plain_grads), jax.tree_util.tree_leaves(want_grads)))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, **close),
                           got_grads, want_grads)
    assert got["metrics"].keys() == want["metrics"].keys()
    for name in want["metrics"]:
        np.testing.assert_allclose(got["metrics"][name], want["metrics"][name], **close,
                                   err_msg=name)
    if want.get("state") is not None:
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, **close),
                               got["state"], want["state"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_padded_masked_batch_trains_as_its_real_rows_alone(method, tmp_path):
    config = tiny_config(method, **METHODS[method])
    config.train.batch_size = BATCH
    trainer = ContinualTrainer(config, str(tmp_path))
    try:
        _assert_padding_trains_as_the_real_rows(trainer, BATCH, REAL)
    finally:
        trainer.close()


@needs_wordnet
@needs_minilm
def test_progressive_prompts_padded_masked_text_batch_trains_as_its_real_rows(
        tmp_path, monkeypatch):
    # without dropout, whose draws depend on the batch's shape (PyTorch's would too)
    monkeypatch.setattr(bert, "_dropout", lambda x, rate, deterministic: x)
    monkeypatch.setattr(progressive_prompts, "_dropout", lambda x, rate, rng: x)
    trainer = ContinualTrainer(_text_config("progressive_prompts"), str(tmp_path))
    try:
        _assert_padding_trains_as_the_real_rows(trainer, 16, 6)  # padding: 6 + 6 + 4
    finally:
        trainer.close()


def _counting_batches(n, batch_size=8, seed=5, **options):
    """TrainBatches over ``n`` 2 x 2 grey images, image ``i`` filled with the value ``i``."""
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)
    source = ArraySource(images, np.arange(n) % 3, name="counting")
    preprocess = pipeline.Preprocess(image_size=2, channels=1, mean=(0.0,), std=(1.0,))
    return pipeline.TrainBatches(source, np.arange(n), np.arange(3), batch_size=batch_size,
                                 seed=seed, preprocess=preprocess, **options)


@pytest.mark.parametrize("processes", [1, 2])
def test_kept_partial_batch_reads_every_example_once_and_masks_the_padding(processes):
    n, size = 23, 8
    kept = [_counting_batches(n, epochs=2, drop_last=False, process_index=p,
                              process_count=processes) for p in range(processes)]
    dropped = _counting_batches(n, epochs=2)
    assert len(kept[0]) == 2 * 3 and len(dropped) == 2 * 2
    assert pipeline.steps_per_epoch(n, size, drop_last=False) == 3
    for epoch in range(2):
        items = [[host[epoch * 3 + s] for host in kept] for s in range(3)]
        index = np.concatenate([h["index"] for step in items for h in step])
        mask = np.concatenate([h["mask"] for step in items for h in step])
        # each example once among the real rows, the padding repeats the last batch's own
        assert sorted(index[mask > 0]) == list(range(n))
        assert mask.sum() == n and set(index[mask == 0]) <= set(index[16:][mask[16:] > 0])
        assert [kept[0].examples_in(epoch * 3 + s) for s in range(3)] == [8, 8, 7]
        pixels = np.concatenate([h["inputs"] for step in items for h in step])
        # rows read as indexed (each image holds its index; the inputs are x / 255)
        np.testing.assert_array_equal(np.rint(pixels[:, 0, 0, 0] * 255), index)
        for s in range(2):  # the full batches are those of drop_last=True, masked all ones
            whole = dropped[epoch * 2 + s]
            np.testing.assert_array_equal(
                np.concatenate([h["index"] for h in items[s]]), whole["index"])
            np.testing.assert_array_equal(np.concatenate([h["mask"] for h in items[s]]), 1.0)
            assert "mask" not in whole


@pytest.mark.parametrize("processes", [1, 2])
def test_batches_crossing_epochs_cut_the_epochs_orders_end_to_end(processes):
    """``cross_epochs`` (tf.data's shuffle, repeat, batch): step s holds rows s*B..(s+1)*B-1
    of the epochs' permutations one after another; epochs * (n // B) steps, so the stream's
    last epochs * (n mod B) examples go unread."""
    n, size, epochs = 23, 8, 3
    hosts = [_counting_batches(n, epochs=epochs, cross_epochs=True, process_index=p,
                               process_count=processes) for p in range(processes)]
    assert len(hosts[0]) == epochs * (n // size) == 6
    stream = np.concatenate([pipeline.epoch_permutation(n, 5, e) for e in range(epochs)])
    read = np.concatenate([h[s]["index"] for s in range(6) for h in hosts])
    np.testing.assert_array_equal(read, stream[:6 * size])
    assert "mask" not in hosts[0][0]
    with pytest.raises(ValueError, match="cross_epochs needs drop_last"):
        _counting_batches(n, cross_epochs=True, drop_last=False)


def test_without_reshuffling_every_epoch_reads_the_first_epochs_order():
    once, each = (_counting_batches(23, epochs=3, reshuffle=reshuffle)
                  for reshuffle in (False, True))
    orders = [np.concatenate([once[e * 2 + s]["index"] for s in range(2)]) for e in range(3)]
    for order in orders[1:]:
        np.testing.assert_array_equal(order, orders[0])
    np.testing.assert_array_equal(orders[0], np.concatenate([each[s]["index"] for s in range(2)]))
    assert not np.array_equal(each[2]["index"], each[0]["index"])  # the default reshuffles


def test_too_few_examples_for_one_batch_train_one_partial_batch_when_kept():
    with pytest.raises(ValueError, match="drop_last=False"):
        _counting_batches(5, seed=0)
    kept = _counting_batches(5, seed=0, drop_last=False)
    assert len(kept) == 1 and kept[0]["mask"].sum() == 5


@pytest.mark.parametrize("keep", [True, False])
def test_a_run_keeping_partial_batches_or_crossing_epochs_compiles_one_train_step(
        keep, tmp_path):
    config = tiny_config("l2p")
    config.scenario.num_tasks = 2
    if keep:
        config.train.drop_last = False
    else:
        config.train.batches_cross_epochs, config.train.epochs = True, 2
    result = train_and_evaluate(config, str(tmp_path))
    trainer = ContinualTrainer(config, str(tmp_path / "count"))
    try:
        sizes = [len(task.train_indices) for task in trainer.tasks]
    finally:
        trainer.close()
    batch, epochs = config.train.batch_size, config.train.epochs
    assert any(size % batch for size in sizes)  # a partial batch to keep or to run on
    per_epoch = [-(-size // batch) if keep else size // batch for size in sizes]
    assert result["train_steps"] == epochs * sum(per_epoch)
    assert result["compilation"]["traces"]["train_step"] == 1


@pytest.mark.slow
def test_a_run_keeping_partial_batches_resumes_bit_identical(tmp_path, monkeypatch):
    """Crashed inside the second task, after a kept partial batch and a checkpoint, the
    resumed run ends as the uninterrupted one: the same matrix, the same task checkpoint."""
    def config():
        c = tiny_config("l2p")
        c.scenario.num_tasks, c.train.epochs, c.train.drop_last = 2, 2, False
        return c
    def crash_at(whole):
        per_task = whole["train_steps"] // 2
        return per_task + per_task // 2 + 2

    assert_crashed_run_resumes_bit_identical(monkeypatch, tmp_path, config, crash_at)


def test_drop_last_must_be_a_bool_and_is_hashed_only_when_kept(tmp_path):
    from pecft_jax.configs import check_run_config
    from pecft_jax.train.loop import config_hash
    config = tiny_config("l2p")
    config.train.drop_last, config.train.batches_cross_epochs = False, True
    with pytest.raises(ValueError, match="leave no partial batch to keep"):
        check_run_config(config)
    config = tiny_config("l2p")
    before = config_hash(config)
    with config.ignore_type():
        config.train.drop_last = 0
    with pytest.raises(ValueError, match="train.drop_last"):
        check_run_config(config)
    with config.ignore_type():
        config.train.drop_last = True
    config.train.batches_cross_epochs, config.train.reshuffle_each_epoch = False, True
    assert config_hash(config) == before  # checkpoints written before the keys resume
    config.train.drop_last = False
    assert config_hash(config) != before
    hide = tiny_config("hide_prompt")
    before = config_hash(hide)
    hide.method.tii_drop_last = True  # the method default, written out by the config files
    assert config_hash(hide) == before
    hide.method.tii_drop_last = False
    assert config_hash(hide) != before
