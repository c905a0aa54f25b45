"""Run (or resume) a continual experiment.

    python -m pecft_jax.run --config experiments/configs/l2p.py:split_mnist --workdir DIR \
        [--config.train.epochs=3 ...]

Writes DIR/results.json (accuracy matrices, metrics), DIR/metrics.jsonl, TensorBoard events
and orbax checkpoints; re-running the same command on DIR resumes where it stopped.

A problem (a bad config value, a config file that does not load, a damaged checkpoint, a
diverged run) ends the command with one line naming it and exit status 1; ``--verbose``
shows the traceback as well.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from pecft_jax.configs import BENCHMARKS, TEXT_BENCHMARKS
from pecft_jax.report import format_plan, format_results

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "experiments", "configs")


def _config_help() -> str:
    """The --config help: the shipped config files (one per method) and the benchmarks."""
    shipped = (sorted(f[:-3] for f in os.listdir(_CONFIGS) if f.endswith(".py"))
               if os.path.isdir(_CONFIGS) else [])
    return ("experiment config file[:benchmark], e.g. experiments/configs/l2p.py:split_mnist. "
            f"Shipped (experiments/configs/<method>.py): {', '.join(shipped) or 'none found'}. "
            f"Benchmarks: {', '.join(BENCHMARKS + TEXT_BENCHMARKS)} (each file's docstring "
            "lists its own, e.g. cifar100_paper, domainnet). Override any field with "
            "--config.<key>=<value>.")


_CONFIG = config_flags.DEFINE_config_file("config", None, _config_help(), lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and results go (required "
                               "unless --dry_run)")
_VERBOSE = flags.DEFINE_bool("verbose", False, "on an error, print the whole traceback")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print what the run would do -- class order, "
                             "every task's classes, examples, epochs and steps, parameter "
                             "counts, the resolved config -- and exit without training or "
                             "writing anything")
flags.mark_flags_as_required(["config"])


def describe(err: BaseException) -> str:
    """One line for an error: the first in its chain of causes that pecft_jax raised (its
    messages name the problem and the fix, e.g. a damaged checkpoint wrapping orbax's
    decoding error), else the innermost cause, with where that was raised when it is
    outside pecft_jax (a line of the user's config file, say)."""
    package = os.path.dirname(os.path.abspath(__file__))

    def raised_in_package(e: BaseException) -> bool:
        frames = traceback.extract_tb(e.__traceback__)
        return bool(frames) and os.path.abspath(frames[-1].filename).startswith(package + os.sep)

    inner = err
    while not raised_in_package(inner) and (inner.__cause__ is not None
                                            or inner.__context__ is not None):
        inner = inner.__cause__ if inner.__cause__ is not None else inner.__context__
    text = " ".join(str(inner).split()) or type(inner).__name__
    if isinstance(inner, KeyError):  # ml_collections' word for a key the config lacks
        return (f"unknown config key {text}: is a --config.... override or a field of the "
                f"config file misspelt?")
    if not isinstance(inner, (ValueError, FileNotFoundError)) or "Errno" in text:
        text = f"{type(inner).__name__}: {text}"
    frames = traceback.extract_tb(inner.__traceback__)
    if frames and not os.path.abspath(frames[-1].filename).startswith(package + os.sep):
        if "site-packages" not in frames[-1].filename:
            text += f" ({frames[-1].filename}, line {frames[-1].lineno})"
    return text


def main(argv):
    del argv
    # Our progress at INFO; libraries (orbax logs every checkpoint step) at WARNING.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("pecft_jax").setLevel(logging.INFO)
    if _DRY_RUN.value:
        from pecft_jax.train.loop import plan_run  # after flags: JAX starts here
        print(format_plan(plan_run(_CONFIG.value)))
        return
    if not _WORKDIR.value:
        raise ValueError("--workdir is required: the folder for checkpoints and results "
                         "(re-running with the same one resumes)")
    from pecft_jax.train.loop import train_and_evaluate  # after flags: JAX starts here
    results = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(format_results(results))
    print(f"results written to {_WORKDIR.value}/results.json")


def entry():
    try:
        app.run(main)
    except Exception as err:  # absl's flag errors and SystemExit pass through untouched
        if type(err).__name__ == "Preempted":  # (the loop's, imported only once JAX starts)
            print(f"{err}", file=sys.stderr)
            sys.exit(128 + err.signum)  # the shell's status for a signal: 143 TERM, 130 INT
        if "--verbose" in sys.argv or "--verbose=true" in sys.argv:
            raise
        print(f"error: {describe(err)}\n(--verbose prints the traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    entry()
