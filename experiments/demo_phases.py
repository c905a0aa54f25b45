"""Where a demo run's wall time goes: timers around the continual loop's phases.

    python experiments/demo_phases.py l2p [--warm-cache]

Runs ``experiments/configs/<method>.py`` (its default benchmark) in a fresh temporary
workdir, with an empty compilation cache unless ``--warm-cache`` (then the default cache
directory), and prints the seconds spent in each phase (a phase's time includes the
compilation of what it runs first) next to the run's compile and trace totals.
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = time.time()


# (owner, attribute, label): the loop's phases, each timed around its calls
PHASES = (("loop", "backbone_from_config", "load the backbone"),
          ("loop.ContinualTrainer", "__init__", "set-up (incl. the backbone)"),
          ("loop.ContinualTrainer", "restore_or_init", "initialise the method"),
          ("loop.ContinualTrainer", "training_queries", "frozen queries of training data"),
          ("loop.ContinualTrainer", "train", "gradient steps (incl. their compilation)"),
          ("loop.ContinualTrainer", "evaluate", "evaluations (incl. test-set queries)"),
          ("checkpoint.Checkpointer", "save", "checkpoints"))
# the method's own work between tasks (statistics passes, fitted heads, subspaces), on the
# method's class: ("method", name, label)
METHOD_PHASES = (("method", "before_task", "the method's before_task / after_task"),
                 ("method", "after_task", "the method's before_task / after_task"))


def instrument(totals: dict, loop, checkpoint, method_class: type,
               patch=setattr) -> None:
    """Wraps every phase of :data:`PHASES` and :data:`METHOD_PHASES` (on ``method_class``,
    the run's method) so that its seconds add up in ``totals[label]`` (``patch`` sets the
    wrapper: ``setattr``, or a test's ``monkeypatch.setattr``)."""
    owners = {"loop": loop, "checkpoint": checkpoint, "method": method_class}
    for owner_path, name, label in PHASES + METHOD_PHASES:
        module, _, attr = owner_path.partition(".")
        owner = getattr(owners[module], attr) if attr else owners[module]
        original = getattr(owner, name)

        def wrapper(*a, _original=original, _label=label, **k):
            started = time.perf_counter()
            try:
                return _original(*a, **k)
            finally:
                totals[_label] = totals.get(_label, 0.0) + time.perf_counter() - started
        patch(owner, name, functools.wraps(original)(wrapper))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("method")
    parser.add_argument("--warm-cache", action="store_true")
    args = parser.parse_args()

    import jax  # noqa: F401  (its import is a phase of its own)
    totals = collections.OrderedDict(imports=time.time() - START)
    from pecft_jax.configs import load_config_file
    from pecft_jax.methods import get_method_class
    from pecft_jax.train import checkpoint, loop
    totals["imports"] = time.time() - START

    config = load_config_file(os.path.join(ROOT, "experiments", "configs", f"{args.method}.py"))
    instrument(totals, loop, checkpoint, get_method_class(config.method.name))
    config.progress_bar = False
    if not args.warm_cache:
        config.compilation_cache_dir = ""
    with tempfile.TemporaryDirectory() as workdir:
        began = time.time()
        results = loop.train_and_evaluate(config, workdir)
        totals["whole run (train_and_evaluate)"] = time.time() - began
    totals["process wall time"] = time.time() - START
    for label, seconds in totals.items():
        print(f"{label:45s} {seconds:7.2f} s")
    c = results["compilation"]
    print(f"{'(compilation, all phases)':45s} {c['compile_seconds']:7.2f} s "
          f"({c['xla_compilations']} programs, {c['cache_hits']} cache reads)")
    print(f"{'(tracing and lowering, all phases)':45s} {c['trace_seconds']:7.2f} s")
    print(f"command: {' '.join(sys.argv)}; load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
