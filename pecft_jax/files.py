"""Files a run writes for people and for later runs: written whole or not at all."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# the mode a plain open() would give a new file (mkstemp's temporary file is owner-only)
_NEW_FILE_MODE = 0o666 & ~_umask()


def write_atomic(path: str, write, mode: str = "w") -> None:
    """Calls ``write(f)`` on a file that becomes ``path`` only once written whole, so a
    crash at any moment leaves either the previous file or the new one, never a truncated
    mix: a temporary file in the same directory, flushed to disk, then renamed over
    ``path`` (``os.replace`` is atomic on POSIX). The file keeps the mode of the one it
    replaces, or gets a new file's usual mode (readable by others under the usual umask:
    a shared workdir's TensorBoard or results reader must be able to read it)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        except FileNotFoundError:
            os.chmod(tmp, _NEW_FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    """:func:`write_atomic` of ``text``."""
    write_atomic(path, lambda f: f.write(text))


def save_figure_atomic(fig, path: str, **savefig_options) -> None:
    """:func:`write_atomic` of a matplotlib figure, in the format of ``path``'s extension
    (the temporary file's own name has none)."""
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    write_atomic(path, lambda f: fig.savefig(f, format=fmt, **savefig_options), mode="wb")


def write_json_atomic(path: str, value: Any, **dump_options) -> None:
    """:func:`write_text_atomic` of ``json.dumps(value, **dump_options)``."""
    write_text_atomic(path, json.dumps(value, **dump_options))
