"""What a run spends on compiling: JAX's persistent compilation cache and a count of the
XLA compilations that really happened.

JAX reports every backend compilation (and every persistent-cache hit, which goes through
the same call) to :mod:`jax.monitoring`; :class:`CompileMonitor` listens to those events, so
its figures count every program of the run -- the loop's steps, the methods' passes,
random initialisation, eager operations -- not only the functions the loop wraps.
"""
from __future__ import annotations

import collections
import os
import threading
from typing import Dict, Optional

import jax
from jax import monitoring

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "pecft_jax", "xla")


class _Totals:
    """Process-wide running totals (JAX's listeners cannot be removed one by one in every
    version, so one set is registered for the process and monitors read differences)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.backend_events = 0
        self.backend_seconds = 0.0
        self.cache_hits = 0
        self.trace_seconds = 0.0
        self.by_function: Dict[str, int] = collections.Counter()
        self.seconds_by_function: Dict[str, float] = collections.Counter()
        self.registered = False

    def on_duration(self, event: str, seconds: float, **kwargs) -> None:
        with self.lock:
            if event == _BACKEND_COMPILE:
                self.backend_events += 1
                self.backend_seconds += seconds
                name = str(kwargs.get("fun_name", "?"))
                self.by_function[name] += 1
                self.seconds_by_function[name] += seconds
            elif event in (_TRACE, _LOWER):
                self.trace_seconds += seconds

    def on_event(self, event: str, **kwargs) -> None:
        if event == _CACHE_HIT:
            with self.lock:
                self.cache_hits += 1

    def snapshot(self) -> dict:
        with self.lock:
            return {"backend_events": self.backend_events,
                    "backend_seconds": self.backend_seconds, "cache_hits": self.cache_hits,
                    "trace_seconds": self.trace_seconds, "by_function": dict(self.by_function),
                    "seconds_by_function": dict(self.seconds_by_function)}


_TOTALS = _Totals()


def _register() -> None:
    if not _TOTALS.registered:
        monitoring.register_event_duration_secs_listener(_TOTALS.on_duration)
        monitoring.register_event_listener(_TOTALS.on_event)
        _TOTALS.registered = True


class CompileMonitor:
    """Counts the XLA compilations (and persistent-cache hits) from its creation on."""

    def __init__(self):
        _register()
        self.start = _TOTALS.snapshot()

    def report(self) -> dict:
        """``xla_compilations``: programs compiled by XLA (cache hits excluded);
        ``cache_hits``: programs read from the persistent cache; ``compile_seconds``: time in
        XLA compilation and cache reads; ``trace_seconds``: tracing and lowering to MLIR;
        ``by_function``: compilations + hits per jitted function name;
        ``seconds_by_function``: their compile (or cache-read) seconds."""
        now = _TOTALS.snapshot()
        hits = now["cache_hits"] - self.start["cache_hits"]
        by_function = {name: count - self.start["by_function"].get(name, 0)
                       for name, count in now["by_function"].items()}
        seconds = {name: total - self.start["seconds_by_function"].get(name, 0.0)
                   for name, total in now["seconds_by_function"].items()}
        return {"xla_compilations": now["backend_events"] - self.start["backend_events"] - hits,
                "cache_hits": hits,
                "compile_seconds": round(now["backend_seconds"] - self.start["backend_seconds"], 3),
                "trace_seconds": round(now["trace_seconds"] - self.start["trace_seconds"], 3),
                "by_function": {k: v for k, v in sorted(by_function.items()) if v},
                "seconds_by_function": {k: round(seconds[k], 3)
                                        for k, v in sorted(by_function.items()) if v}}


def enable_persistent_cache(directory: Optional[str]) -> Optional[str]:
    """Points JAX's persistent compilation cache at ``directory`` (``~`` expanded; empty or
    None: leave JAX's setting alone). A re-run or a resumed run then reads its programs
    instead of compiling them. Only the first directory of a process takes effect (JAX
    initialises the cache once); the one in use is returned."""
    current = jax.config.jax_compilation_cache_dir
    if not directory or current:
        return current
    path = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache every program: the per-task passes compile in well under JAX's default 1 s
    # threshold, and together they are most of a small run's compile time.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
