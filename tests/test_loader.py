"""grain reads the pipeline's batch sequences: the same batches, in the same order, whatever
the reading threads and worker processes; its iterator state resumes exactly; a run with
worker processes, interrupted and resumed from the state in its checkpoint, ends where a
run read in threads ends."""
import numpy as np
import pytest

from pecft_jax.data import ArraySource, Preprocess, ReadOptions, loader, pipeline
from pecft_jax.train.checkpoint import Checkpointer
from pecft_jax.train.loop import train_and_evaluate

from helpers import Interrupted, crash_at_training_batch, tiny_config


def _source(n=90, size=12, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ArraySource(images, np.arange(n) % 5, num_classes=5)


def _train_batches(**kwargs):
    preprocess = Preprocess(image_size=10, channels=3, augment=True, flip=True,
                            random_resized_crop=True, brightness=0.3)
    source = _source()
    return pipeline.TrainBatches(source, np.arange(3, len(source)), np.arange(5),
                                 batch_size=8, seed=7, preprocess=preprocess, epochs=3, **kwargs)


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


OPTIONS = [ReadOptions(threads=0), ReadOptions(threads=1, prefetch=1),
           ReadOptions(threads=3, prefetch=4), ReadOptions(threads=1, processes=2)]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: f"t{o.threads}p{o.processes}")
def test_grain_reads_the_sequence_in_order(options):
    batches = _train_batches()
    expected = [batches[i] for i in range(len(batches))]
    iterator = loader.read(batches, options)
    try:
        _assert_same(list(iterator), expected)
    finally:
        loader.close(iterator)
    # the generator API reads the same sequence, epoch by epoch
    per_epoch = batches.per_epoch
    source, preprocess = batches.source, batches.preprocess
    epoch2 = list(pipeline.train_batches(source, np.arange(3, 90), np.arange(5), batch_size=8,
                                         seed=7, epoch=2, preprocess=preprocess, start_step=1))
    _assert_same(epoch2, expected[2 * per_epoch + 1:])


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: f"t{o.threads}p{o.processes}")
def test_a_restored_iterator_state_continues_at_the_next_batch(options):
    batches = _train_batches()
    expected = [batches[i] for i in range(len(batches))]
    first = loader.read(batches, options, start=2)
    try:
        _assert_same([next(first) for _ in range(9)], expected[2:11])
        saved = loader.checkpoint_state(first, options, start=2, position=11)
    finally:
        loader.close(first)
    resumed, start = loader.resume(batches, options, saved, position=11)
    try:
        assert start == 2  # rebuilt as the saved iterator was, then its state restored
        _assert_same(list(resumed), expected[11:])
    finally:
        loader.close(resumed)


def test_a_state_from_other_worker_processes_resumes_at_its_position():
    batches = _train_batches()
    saved = {"grain_state": {"next_index": 5}, "start": 0, "processes": 2, "position": 5}
    iterator, start = loader.resume(batches, ReadOptions(threads=2), saved, position=5)
    assert start == 5  # not grain's state (it belongs to two workers): started at item 5
    _assert_same(list(iterator), [batches[i] for i in range(5, len(batches))])
    # nor a state saved at another position (an older checkpoint's)
    iterator, start = loader.resume(batches, ReadOptions(threads=2), saved, position=7)
    assert start == 7 and len(list(iterator)) == len(batches) - 7


def test_stream_batches_read_by_grain_equal_the_stream():
    parts = [(_source(20, seed=1), np.arange(20)), (_source(30, size=16, seed=2), np.arange(7))]
    preprocess = Preprocess(image_size=10, channels=3, augment=True, flip=True)
    stream = pipeline.StreamBatches(parts, np.arange(5), batch_size=8, preprocess=preprocess,
                                    augment_seed=3)
    expected = list(pipeline.eval_stream(parts, np.arange(5), batch_size=8,
                                         preprocess=preprocess, augment_seed=3))
    assert len(stream) == len(expected) == 4
    _assert_same(list(loader.read(stream, ReadOptions(threads=3))), expected)
    assert expected[-1]["mask"].sum() == 27 - 3 * 8


def test_bad_read_options_are_named():
    with pytest.raises(ValueError, match="threads must be an int >= 0"):
        ReadOptions(threads=-1)
    with pytest.raises(ValueError, match="processes > 0 needs threads >= 1"):
        ReadOptions(threads=0, processes=2)
    with pytest.raises(ValueError, match="start 99 outside"):
        loader.read(_train_batches(), start=99)
    with pytest.raises(IndexError, match="step 30 outside the 30 steps"):
        _train_batches()[30]


def _run_config(**train):
    c = tiny_config()
    c.scenario.num_tasks = 2
    c.train.epochs = 2
    c.train.checkpoint_every_steps = 3
    for key, value in train.items():
        c.train[key] = value
    return c


@pytest.mark.slow
def test_a_run_read_by_worker_processes_resumes_from_their_state(tmp_path, monkeypatch):
    """Two grain worker processes: interrupted inside task 1 after a checkpoint, resumed from
    the workers' iterator state, the run ends bit-identical to one read in threads."""
    threads = train_and_evaluate(_run_config(read_threads=2), str(tmp_path / "threads"))
    per_task = threads["train_steps"] // 2
    undo = crash_at_training_batch(monkeypatch, per_task + 5)  # after task 1's step-3 checkpoint
    with pytest.raises(Interrupted):
        train_and_evaluate(_run_config(read_threads=1, read_processes=2),
                           str(tmp_path / "processes"))
    undo()
    ckpt = Checkpointer(str(tmp_path / "processes"))
    _, _, meta = ckpt.latest()
    ckpt.close()
    saved = meta["input_iterator"]
    assert (meta["task"], saved["position"], saved["processes"]) == (1, 3, 2)
    assert "iterators_in_use_states" in saved["grain_state"]  # the two workers' state
    resumed = train_and_evaluate(_run_config(read_threads=1, read_processes=2),
                                 str(tmp_path / "processes"))
    assert resumed["accuracy_matrix"] == threads["accuracy_matrix"]


class _Broken:
    def __len__(self):
        return 6

    def __getitem__(self, i):
        if i == 3:
            raise OSError(f"unreadable record {i}")
        return {"x": np.full(2, i)}


@pytest.mark.parametrize("options", OPTIONS[:3], ids=lambda o: f"t{o.threads}p{o.processes}")
def test_a_reading_error_reaches_the_consumer(options):
    iterator = loader.read(_Broken(), options)
    got = []
    with pytest.raises(OSError, match="unreadable record 3"):
        for batch in iterator:
            got.append(int(batch["x"][0]))
    assert got == [0, 1, 2]  # the batches before it arrive, in order
