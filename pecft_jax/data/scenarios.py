"""Continual-learning scenarios: a class order, then a sequence of tasks over real sources.

Labels are remapped to the class order: the class ``class_order[i]`` becomes label ``i``, so
task 0 always owns labels ``0..m-1``, task 1 the next ones, and a classifier head can grow
by appending columns. The loop trains and evaluates on remapped labels
(``scenario.label_map()[original_label]``).

Kinds:
  * ``'class'`` — class-incremental: disjoint class groups, one shared head, no task id at
    test time.
  * ``'task'`` — task-incremental: the same split, but the task id is known at test time.
  * ``'domain'`` — domain-incremental: every task has all classes, each from another domain
    (another dataset with the same classes, or the same data seen through a transform).
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Sequence

import numpy as np

from pecft_jax.data.sources import (DEFAULT_SPLIT_SEED, LabelledSource, LabelOffsetSource,
                                    TransformedSource, load_source)

KINDS = ("class", "task", "domain")


@dataclasses.dataclass
class Task:
    """One task: which (remapped) classes it teaches and where its examples are."""
    index: int
    classes: tuple[int, ...]       # remapped label ids (positions in class_order)
    train_indices: np.ndarray      # into train_source
    test_indices: np.ndarray       # into test_source
    train_source: LabelledSource
    test_source: LabelledSource
    domain: str | None = None

    @property
    def num_train(self) -> int:
        return int(len(self.train_indices))

    @property
    def num_test(self) -> int:
        return int(len(self.test_indices))


@dataclasses.dataclass
class Scenario:
    """A sequence of tasks sharing one class order.

    ``num_classes`` is the number of classes taking part (the size of a full head), i.e.
    ``len(class_order)``; ``label_space`` is the size of the sources' original label space
    (larger when a dataset declares classes that have no examples, e.g. ImageNet-R's 200
    of ImageNet's 1000 labels).
    """
    kind: str                      # 'class' | 'task' | 'domain'
    tasks: list[Task]
    class_order: list[int]         # original class ids, in the order they are learnt
    num_classes: int
    label_space: int | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def label_map(self) -> np.ndarray:
        """``(label_space,)`` int64: original class id -> remapped id (its rank in
        ``class_order``); -1 for ids that take no part."""
        size = max(self.label_space or 0, max(self.class_order, default=-1) + 1)
        mapping = np.full(size, -1, np.int64)
        mapping[np.asarray(self.class_order, np.int64)] = np.arange(len(self.class_order))
        return mapping

    def seen_classes(self, t: int) -> tuple[int, ...]:
        """Remapped ids of all classes taught by tasks ``0..t`` (sorted)."""
        if not 0 <= t < len(self.tasks):
            raise IndexError(f"task {t} out of range for a scenario of {len(self.tasks)} tasks")
        seen = set()
        for task in self.tasks[:t + 1]:
            seen.update(task.classes)
        return tuple(sorted(seen))

    def class_names(self, source: LabelledSource | None = None) -> list[str]:
        """Class names in remapped order (names of the first task's train source by default)."""
        source = source or self.tasks[0].train_source
        return [source.class_names[c] for c in self.class_order]


# --------------------------------------------------------------------------- class order
def resolve_class_order(classes: int | Sequence[int], class_order: Any = None, seed: int = 0
                        ) -> list[int]:
    """The class order over ``classes`` (a count ``C`` meaning ``range(C)``, or the sorted
    original ids taking part): an explicit list (validated), ``'identity'`` (ascending),
    ``'seed'``/``None`` for a permutation from ``np.random.default_rng(seed)`` (with all of
    ``range(C)`` taking part this is exactly ``default_rng(seed).permutation(C)``), or
    ``'pycil'``: PyCIL's ``np.random.seed(seed); np.random.permutation(C)`` -- the order
    of PyCIL, LAMDA-PILOT and the pre-trained-model methods built on them (SimpleCIL, APER,
    EASE, SLCA, SSIAT, RanPAC), e.g. ``[68, 56, 78, 8, 23, ...]`` for CIFAR-100 with seed
    1993; or ``'python_shuffle'``: ``random.seed(seed); random.shuffle(order)`` of the
    ascending ids -- CODA-Prompt's order for its runs with seed > 0 (its seed-0 run, the
    one its scripts launch, keeps the identity)."""
    ids = (np.arange(classes) if isinstance(classes, (int, np.integer))
           else np.asarray(sorted(int(c) for c in classes), np.int64))
    if class_order is None or (isinstance(class_order, str) and class_order == "seed"):
        return [int(c) for c in ids[np.random.default_rng(seed).permutation(len(ids))]]
    if isinstance(class_order, str):
        if class_order == "identity":
            return [int(c) for c in ids]
        if class_order == "pycil":  # the legacy global generator, seeded as PyCIL seeds it
            return [int(c) for c in ids[np.random.RandomState(seed).permutation(len(ids))]]
        if class_order == "python_shuffle":  # Python's Mersenne Twister, as CODA seeds it
            order = [int(c) for c in ids]
            random.Random(seed).shuffle(order)
            return order
        raise ValueError(f"class_order must be 'seed', 'pycil', 'python_shuffle', 'identity' or "
                         f"a list of class ids, got {class_order!r}")
    order = [int(c) for c in class_order]
    valid = set(ids.tolist())
    missing = sorted(valid - set(order))
    duplicated = sorted({c for c in order if order.count(c) > 1})
    unknown = sorted(set(order) - valid)
    if missing or duplicated or unknown:
        problems = []
        if missing:
            problems.append(f"missing {missing}")
        if duplicated:
            problems.append(f"duplicated {duplicated}")
        if unknown:
            problems.append(f"not classes of the data: {unknown}")
        raise ValueError(f"class_order must list each of the {len(ids)} class ids exactly once "
                         f"({'; '.join(problems)}); fix the list or use class_order='seed'")
    return order


def task_sizes(num_classes: int, num_tasks: int, first_task_classes: int | None = None
               ) -> list[int]:
    """Classes per task: equal groups, or ``B-m Inc-n`` (``m`` first, then equal groups)."""
    if num_tasks <= 0:
        raise ValueError(f"num_tasks must be positive, got {num_tasks}")
    if first_task_classes is None:
        if num_classes % num_tasks:
            divisors = [d for d in range(1, num_classes + 1) if num_classes % d == 0]
            raise ValueError(f"{num_classes} classes cannot be split into {num_tasks} equal tasks; "
                             f"use num_tasks in {divisors} or set first_task_classes (B-m Inc-n)")
        return [num_classes // num_tasks] * num_tasks
    m = int(first_task_classes)
    if not 0 < m <= num_classes:
        raise ValueError(f"first_task_classes must be in [1, {num_classes}], got {m}")
    if num_tasks == 1:
        if m != num_classes:
            raise ValueError(f"with num_tasks=1 the first task must hold all {num_classes} "
                             f"classes; set first_task_classes={num_classes} or None")
        return [m]
    rest = num_classes - m
    if rest == 0 or rest % (num_tasks - 1):
        raise ValueError(f"after a first task of {m} classes, the other {rest} classes cannot be "
                         f"split into {num_tasks - 1} equal tasks; change num_tasks or "
                         "first_task_classes")
    return [m] + [rest // (num_tasks - 1)] * (num_tasks - 1)


def _check_pair(train: LabelledSource, test: LabelledSource) -> int:
    if train.num_classes != test.num_classes:
        raise ValueError(f"train source {train.name} has {train.num_classes} classes but test "
                         f"source {test.name} has {test.num_classes}; use splits of one dataset")
    return train.num_classes


def _present_classes(source: LabelledSource) -> np.ndarray:
    return np.unique(source.labels)


# --------------------------------------------------------------------------- builders
def class_incremental(train: LabelledSource, test: LabelledSource, num_tasks: int, *,
                      first_task_classes: int | None = None, class_order: Any = None,
                      seed: int = 0, kind: str = "class") -> Scenario:
    """Split the classes of ``train``/``test`` into ``num_tasks`` disjoint groups.

    The classes taking part are those with training examples (usually all of them). Test
    examples of other classes are left out.

    Args:
      train, test: two splits of one dataset.
      num_tasks: number of tasks.
      first_task_classes: ``m`` of ``B-m Inc-n`` (the first task's size); None = equal tasks.
      class_order: ``'seed'``/None (permutation from ``seed``), ``'identity'`` or a list.
      seed: seed of the class permutation.
      kind: ``'class'`` or ``'task'``.
    """
    if kind not in ("class", "task"):
        raise ValueError(f"class_incremental builds kind 'class' or 'task', got {kind!r}")
    label_space = _check_pair(train, test)
    present = _present_classes(train)
    if len(present) == 0:
        raise ValueError(f"train source {train.name} ({train.split}) has no examples")
    sizes = task_sizes(len(present), num_tasks, first_task_classes)
    order = resolve_class_order(present, class_order, seed)
    # Rank of every original class in the order (label_space = not taking part);
    # examples are routed to tasks by rank.
    rank = np.full(label_space, label_space, np.int64)
    rank[np.asarray(order)] = np.arange(len(order))
    train_rank, test_rank = rank[train.labels], rank[test.labels]
    tasks, start = [], 0
    for t, size in enumerate(sizes):
        stop = start + size
        tasks.append(Task(
            index=t, classes=tuple(range(start, stop)),
            train_indices=np.flatnonzero((train_rank >= start) & (train_rank < stop)),
            test_indices=np.flatnonzero((test_rank >= start) & (test_rank < stop)),
            train_source=train, test_source=test))
        start = stop
    return Scenario(kind=kind, tasks=tasks, class_order=order, num_classes=len(order),
                    label_space=label_space)


def task_incremental(train: LabelledSource, test: LabelledSource, num_tasks: int, *,
                     first_task_classes: int | None = None, class_order: Any = None,
                     seed: int = 0) -> Scenario:
    """The class-incremental split with ``kind='task'`` (task id known at test time)."""
    return class_incremental(train, test, num_tasks, first_task_classes=first_task_classes,
                             class_order=class_order, seed=seed, kind="task")


def dataset_sequence(datasets: Sequence[tuple[str, LabelledSource, LabelledSource]]) -> Scenario:
    """Class-incremental over a sequence of datasets, one task each (e.g. 5-datasets:
    CIFAR-10, MNIST, Fashion-MNIST, SVHN, notMNIST). Task ``t`` owns the next
    ``num_classes`` label ids; images of different sizes/channels are made uniform by the
    pipeline's resize and channel conversion."""
    if not datasets:
        raise ValueError("dataset_sequence needs at least one (name, train, test) dataset")
    total = sum(_check_pair(train, test) for _, train, test in datasets)
    names = [f"{name}:{c}" for name, train, _ in datasets for c in train.class_names]
    tasks, offset = [], 0
    for t, (name, train, test) in enumerate(datasets):
        size = train.num_classes
        shifted_train = LabelOffsetSource(train, offset, total, names)
        shifted_test = LabelOffsetSource(test, offset, total, names)
        tasks.append(Task(index=t, classes=tuple(range(offset, offset + size)),
                          train_indices=np.arange(len(train)), test_indices=np.arange(len(test)),
                          train_source=shifted_train, test_source=shifted_test, domain=name))
        offset += size
    return Scenario(kind="class", tasks=tasks, class_order=list(range(total)), num_classes=total)


def domain_incremental(domains: Sequence[tuple[str, LabelledSource, LabelledSource]], *,
                       class_order: Any = None, seed: int = 0) -> Scenario:
    """One task per ``(name, train, test)`` domain; every task has every class.

    The domains must share the class set: the same label space and the same classes present
    in every domain's train split.
    """
    if not domains:
        raise ValueError("domain_incremental needs at least one (name, train, test) domain")
    first_name, first_train, _ = domains[0]
    label_space = first_train.num_classes
    present = _present_classes(first_train)
    for name, train, test in domains:
        n = _check_pair(train, test)
        if n != label_space:
            raise ValueError(f"domain {name!r} has {n} classes but domain {first_name!r} has "
                             f"{label_space}; domains must share one class set")
        here = _present_classes(train)
        if not np.array_equal(here, present):
            differ = sorted(set(here.tolist()) ^ set(present.tolist()))
            raise ValueError(f"domains {first_name!r} and {name!r} do not share one class set "
                             f"(classes {differ} have training examples in only one of them)")
    # Every task holds every class, so the order only fixes the label ids: identity unless
    # asked otherwise.
    order = resolve_class_order(present, "identity" if class_order is None else class_order, seed)
    rank = np.full(label_space, -1, np.int64)
    rank[np.asarray(order)] = np.arange(len(order))
    all_classes = tuple(range(len(order)))
    tasks = [Task(index=t, classes=all_classes, train_indices=np.arange(len(train)),
                  test_indices=np.flatnonzero(rank[test.labels] >= 0),
                  train_source=train, test_source=test, domain=name)
             for t, (name, train, test) in enumerate(domains)]
    return Scenario(kind="domain", tasks=tasks, class_order=order, num_classes=len(order),
                    label_space=label_space)


# --------------------------------------------------------------------------- from a config
def _get(cfg, key: str, default=None):
    """``cfg.key`` for a ConfigDict / dict / object, ``default`` when absent or None."""
    if cfg is None:
        return default
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


# what an entry of scenario.domains / scenario.datasets may hold beyond its name: its
# transforms, its own data_dir and splits (notMNIST has only a train split, which L2P's
# code cuts 80/20), and, for a 'csv' text dataset, the columns its text comes from
ENTRY_KEYS = ("name", "transforms", "data_dir", "train_split", "test_split", "csv_columns",
              "csv_join")
SOURCE_OPTIONS = ("csv_columns", "csv_join")


def parse_domain_spec(spec: Any) -> dict:
    """A domain entry of ``cfg.scenario.domains`` (or ``scenario.datasets``) as a dict of
    :data:`ENTRY_KEYS` plus ``label`` and ``source_options`` (those of
    :data:`SOURCE_OPTIONS` it sets, for ``sources.load_source``).

    Accepted: ``'mnist5k'``, ``'mnist5k+rotate90+invert'`` (dataset then transforms),
    or a mapping with ``name`` and optional ``transforms`` (list), ``data_dir``,
    ``train_split`` / ``test_split`` (this entry's, instead of ``dataset.*_split``) and
    ``csv_columns`` / ``csv_join``.
    """
    if isinstance(spec, str):
        name, *transforms = spec.split("+")
        return {"name": name, "transforms": transforms, "data_dir": None, "label": spec,
                "train_split": None, "test_split": None, "source_options": {}}
    name = _get(spec, "name")
    if not name:
        raise ValueError(f"domain entry {spec!r} has no 'name'; write 'dataset+transform' or "
                         "{'name': ..., 'transforms': [...]}")
    keys = spec.keys() if hasattr(spec, "keys") else ()
    unknown = sorted(set(keys) - set(ENTRY_KEYS))
    if unknown:
        raise ValueError(f"entry {name!r} of scenario.domains / scenario.datasets has unknown "
                         f"keys {unknown}; an entry may hold {list(ENTRY_KEYS)}")
    transforms = list(_get(spec, "transforms", []))
    return {"name": name, "transforms": transforms, "data_dir": _get(spec, "data_dir"),
            "label": "+".join([name] + transforms),
            "train_split": _get(spec, "train_split"), "test_split": _get(spec, "test_split"),
            "source_options": {k: _get(spec, k) for k in SOURCE_OPTIONS
                               if _get(spec, k) is not None}}


def build_scenario(cfg) -> Scenario:
    """Build the scenario a config describes.

    Reads ``cfg.dataset``: ``name``, optional ``data_dir``, ``train_split`` ('train'),
    ``test_split`` ('test'), ``split_seed`` (held-out split of mnist5k/digits, default 0),
    ``image_key``/``label_key`` (TFDS); and ``cfg.scenario``: ``kind`` ('class' | 'task' |
    'domain'), ``num_tasks``, ``first_task_classes`` (B-m Inc-n; 0/None = equal tasks),
    ``class_order`` ('seed', 'identity' or a list), ``seed`` (class-order seed; falls back
    to ``cfg.seed``), and for kind 'domain' ``domains`` (see :func:`parse_domain_spec`;
    ``num_tasks``, if set and not 0, must equal their number).
    """
    ds, sc = _get(cfg, "dataset"), _get(cfg, "scenario")
    if sc is None:
        raise ValueError("config has no 'scenario' section (kind, num_tasks, ...)")
    kind = _get(sc, "kind", "class")
    if kind not in KINDS:
        raise ValueError(f"scenario.kind must be one of {KINDS}, got {kind!r}")
    seed = int(_get(sc, "seed", _get(cfg, "seed", 0)))
    options = dict(seed=int(_get(ds, "split_seed", DEFAULT_SPLIT_SEED)),
                   image_key=_get(ds, "image_key", "image"),
                   label_key=_get(ds, "label_key", "label"))
    if _get(ds, "max_per_class"):
        options["max_per_class"] = int(_get(ds, "max_per_class"))
    if ds is not None and _get(ds, "test_fraction") is not None:
        options["test_fraction"] = float(_get(ds, "test_fraction"))
    train_split, test_split = _get(ds, "train_split", "train"), _get(ds, "test_split", "test")
    opened = {}  # entries of one dataset (same folder, splits, options) share its sources

    def open_entry(spec: dict) -> tuple:
        """``(train, test)`` of a parsed entry: its own data_dir, splits and source options
        where it sets them, else the dataset's."""
        data_dir = spec["data_dir"] or _get(ds, "data_dir")
        splits = (spec["train_split"] or train_split, spec["test_split"] or test_split)
        key = (spec["name"], data_dir, splits, repr(sorted(spec["source_options"].items())))
        if key not in opened:
            opened[key] = tuple(load_source(spec["name"], split, data_dir=data_dir, **options,
                                            **spec["source_options"]) for split in splits)
        return opened[key]

    if kind == "domain":
        specs = list(_get(sc, "domains", []))
        if not specs:
            raise ValueError("scenario.kind='domain' needs scenario.domains, e.g. "
                             "['mnist5k', 'mnist5k+rotate90', 'mnist5k+invert']")
        num_tasks = _get(sc, "num_tasks") or None
        if num_tasks is not None and int(num_tasks) != len(specs):
            raise ValueError(f"scenario.num_tasks={num_tasks} but {len(specs)} domains are "
                             "listed; make them equal (or leave num_tasks unset)")
        domains = []
        for spec in map(parse_domain_spec, specs):
            train, test = open_entry(spec)
            if spec["transforms"]:
                train = TransformedSource(train, spec["transforms"])
                test = TransformedSource(test, spec["transforms"])
            domains.append((spec["label"], train, test))
        return domain_incremental(domains, class_order=_get(sc, "class_order", "identity"),
                                  seed=seed)

    if _get(sc, "datasets"):  # a sequence of datasets, one task each (5-datasets)
        order = _get(sc, "class_order", None)
        if not (order is None or (isinstance(order, str) and order == "identity")):
            raise ValueError(
                f"scenario.class_order={order!r} has no effect on a sequence "
                "of datasets (scenario.datasets): each task is one dataset, its classes in "
                "the dataset's order; reorder scenario.datasets instead and leave "
                "scenario.class_order unset")
        specs = [parse_domain_spec(spec) for spec in _get(sc, "datasets")]
        num_tasks = _get(sc, "num_tasks")
        if num_tasks is not None and int(num_tasks) != len(specs):
            raise ValueError(f"scenario.num_tasks={num_tasks} but {len(specs)} datasets are "
                             "listed in scenario.datasets; make them equal")
        return dataset_sequence([(spec["label"], *open_entry(spec)) for spec in specs])

    name = _get(ds, "name")
    if not name:
        raise ValueError("config needs dataset.name (e.g. 'mnist5k', 'tfds:cifar100')")
    num_tasks = _get(sc, "num_tasks")
    if num_tasks is None:
        raise ValueError("config needs scenario.num_tasks")
    data_dir = _get(ds, "data_dir")
    train = load_source(name, train_split, data_dir=data_dir, **options)
    test = load_source(name, test_split, data_dir=data_dir, **options)
    # 0 means unset, so a ConfigDict field can hold an int placeholder overridable from the CLI.
    first = _get(sc, "first_task_classes") or None
    return class_incremental(train, test, int(num_tasks),
                             first_task_classes=None if first is None else int(first),
                             class_order=_get(sc, "class_order", "seed"), seed=seed, kind=kind)
