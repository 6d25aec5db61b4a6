"""Safe file access for checkpoints: regular files only, bounded JSON, modes that honour the umask.

A checkpoint folder is read by the runtime and by transformers (config, tokenizer). A FIFO would
block the reader forever, a device or ``/proc`` file would be read as garbage or without end, and
a dangling symlink gives a bare ``OSError``; every such entry is refused here with one line that
names it. Written files get ``0o666 & ~umask`` (usually 0644), not ``mkstemp``'s 0600, so a
checkpoint written by one user is readable by the uid a container runs as.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

__all__ = [
    "special_file_problem",
    "current_umask",
    "public_mode",
    "read_json_file",
    "MAX_JSON_FILE_BYTES",
    "MAX_CONFIG_JSON_DEPTH",
]

MAX_JSON_FILE_BYTES = 64 << 20  # config.json, tokenizer_config.json... (tokenizer.json is ~10 MB at most)
MAX_CONFIG_JSON_DEPTH = 64
_KERNEL_ROOTS = ("/proc", "/sys", "/dev")


def special_file_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a plain readable regular file (``None`` when it is one).

    Symlinks are followed; their target must be a regular file outside ``/proc``, ``/sys`` and ``/dev``."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return "is a dangling symlink" if p.is_symlink() else "does not exist"
    except OSError as exc:
        return f"cannot be examined ({exc.strerror or exc})"
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe), not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    real = os.path.realpath(p)
    if any(real == root or real.startswith(root + "/") for root in _KERNEL_ROOTS):
        return f"resolves to {real}, a kernel file, not a regular file"
    return None


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # the classic dance; brief and restored at once
    os.umask(mask)
    return mask


def public_mode(directory: bool = False) -> int:
    """``0o666`` (files) or ``0o777`` (folders) less the umask: what ``open``/``mkdir`` would give."""
    return (0o777 if directory else 0o666) & ~current_umask()


def read_json_file(path: Path, what: str, max_depth: int = MAX_CONFIG_JSON_DEPTH) -> Any:
    """Parse a small JSON file: a regular file, at most ``MAX_JSON_FILE_BYTES``, nesting at most
    ``max_depth``. Raises ``ValueError`` with a one-line reason (the caller adds the file and what to do)."""
    problem = special_file_problem(path)
    if problem:
        raise ValueError(f"{what} {problem}")
    try:
        size = os.stat(path).st_size
        if size > MAX_JSON_FILE_BYTES:
            raise ValueError(f"{what} is {size} bytes, above the limit of {MAX_JSON_FILE_BYTES}")
        text = Path(path).read_bytes().decode("utf-8")
        value = json.loads(text)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ValueError(f"{what} cannot be read ({exc.strerror or exc}); check its permissions") from None
    except RecursionError:
        raise ValueError(f"{what} nests too deeply") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > max_depth:
                raise ValueError(f"{what} nests deeper than {max_depth} levels")
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return value
