"""Reading batches with grain: decoding, resizing and augmentation in parallel, in order.

The batches themselves are defined in :mod:`pecft_jax.data.pipeline` as random-access
sequences (:class:`~pecft_jax.data.pipeline.TrainBatches`,
:class:`~pecft_jax.data.pipeline.StreamBatches`) whose item ``i`` is a pure function of
``i``. grain reads such a sequence as a ``MapDataset`` source:

* ``threads`` reading threads (grain's ``ReadOptions.num_threads``) build the next batches
  while the device runs the current step: PIL's decoding and resizing and numpy's
  arithmetic release the GIL, so threads scale on the host's cores;
* ``processes`` > 0 adds grain's worker processes (``mp_prefetch``), each reading every
  ``processes``-th batch with its own threads: for transforms that hold the GIL, at the cost
  of starting the workers (they import this library) for every task;
* grain returns the batches in sequence order whatever the threads and processes, so the
  data a run sees does not depend on them (tests compare against reading in one thread).

A training iterator's state (grain's ``get_state``) goes into every checkpoint; a resumed
run restores it with ``set_state`` and continues at the next batch without reading the
skipped ones.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, Mapping, Sequence

import grain.python as grain
from absl import flags

log = logging.getLogger("pecft_jax")


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How batches are read (none of it changes what they contain).

    Attributes:
      threads: reading threads; 0 reads in the consuming thread (no read-ahead).
      processes: grain worker processes, each with ``threads`` threads; 0: none.
      prefetch: batches read ahead, per process (at least ``threads``: each thread reads
        one batch ahead).
    """
    threads: int = 2
    processes: int = 0
    prefetch: int = 2

    def __post_init__(self):
        for field in ("threads", "processes", "prefetch"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ReadOptions.{field} must be an int >= 0, got {value!r}")
        if self.processes and not self.threads:
            raise ValueError("ReadOptions.processes > 0 needs threads >= 1 (config "
                             "train.read_processes, train.read_threads): each worker process "
                             "reads with that many threads; set --config.train.read_threads=1")


def read(batches: Sequence, options: ReadOptions = ReadOptions(), start: int = 0,
         state: Mapping | None = None) -> grain.DatasetIterator:
    """A grain iterator over ``batches[start:]`` (any sequence with ``len`` and ``[i]``), in
    order; batches before ``start`` are never read. ``state``: what ``get_state()`` returned
    on an iterator built with the same arguments; this one continues where that one was."""
    if not 0 <= start <= len(batches):
        raise ValueError(f"start {start} outside [0, {len(batches)}]")
    dataset = grain.MapDataset.source(batches)[start:]
    # grain keeps at most prefetch_buffer_size reads in flight: no fewer than the threads
    iterable = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=options.threads,
        prefetch_buffer_size=max(options.prefetch, options.threads) if options.threads else 0))
    if options.processes:
        # grain's workers read absl flags (their defaults are fine): a library caller that
        # is not an absl app has not parsed them
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=options.processes, per_worker_buffer_size=max(options.prefetch, 1)))
    iterator = iter(iterable)
    if state is not None:
        try:
            iterator.set_state(dict(state))
        except Exception:  # no worker processes left behind by a state that does not fit
            close(iterator)
            raise
    return iterator


def close(iterator: Iterator) -> None:
    """Stops an iterator's worker processes now (rather than at garbage collection)."""
    closer = getattr(iterator, "close", None)
    if closer is not None:
        closer()


def checkpoint_state(iterator: grain.DatasetIterator, options: ReadOptions, start: int,
                     position: int) -> dict[str, Any]:
    """What a checkpoint keeps of a training iterator at item ``position`` (the next one it
    returns): grain's state, and how to rebuild the iterator it belongs to (the start of
    the sequence it reads and its worker processes)."""
    return {"grain_state": iterator.get_state(), "start": int(start),
            "processes": int(options.processes), "position": int(position)}


def resume(batches: Sequence, options: ReadOptions, saved: Mapping | None,
           position: int) -> tuple[grain.DatasetIterator, int]:
    """``(iterator, start)`` for a run that continues at item ``position``: grain's saved
    state restored, when it was saved at this ``position`` with as many worker processes
    (grain's per-worker states do not carry over to another count); else a fresh iterator
    started at ``position``, which reads the same batches (each is a function of its index)."""
    if (saved is not None and int(saved.get("position", -1)) == position
            and int(saved.get("processes", -1)) == options.processes):
        start = int(saved["start"])
        try:
            return read(batches, options, start=start, state=saved["grain_state"]), start
        except (KeyError, TypeError, ValueError) as err:  # e.g. a state from another grain
            log.warning("the saved input iterator state does not restore (%s: %s); reading "
                        "from step %d afresh (the same batches)", type(err).__name__, err,
                        position)
    return read(batches, options, start=position), position
