"""What makes a folder a thawed checkpoint, and the checks on its entries before anything is read.

A folder is a thawed checkpoint exactly when it holds ``thawed.json`` (the marker, format v2) or
an entry named ``model.thawed.safetensors`` (v1 folders have no marker), in any form: a regular
file, a dangling symlink, a FIFO, a directory. Such a folder is opened by the thawed reader and
nothing else, so a damaged checkpoint gives a thawed error, never a fall-through to the dense
Hugging Face loader (which would look for ``model.safetensors``, or worse, a pickle).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import CheckpointNotFoundError
from .files import read_json_file, special_file_problem
from .format import FORMAT_NAME, FORMAT_VERSION, MARKER_FILE, PAYLOAD_FILE

__all__ = ["is_thawed_folder", "check_folder", "marker_text"]

_FIX = "copy the checkpoint again or re-run `thawed compress`"


def is_thawed_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder that claims to be a thawed checkpoint (marker or payload entry)."""
    p = Path(path)
    return p.is_dir() and (os.path.lexists(p / MARKER_FILE) or os.path.lexists(p / PAYLOAD_FILE))


def marker_text() -> str:
    """The marker file's content: what wrote the folder, for people and tools that list it."""
    return json.dumps({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "payload": PAYLOAD_FILE},
                      sort_keys=True) + "\n"


def check_folder(folder: Path) -> None:
    """Refuse a checkpoint folder whose payload is missing or whose entries are not plain files.

    Every top-level entry that is not a folder must be a regular file (transformers reads the
    config and tokenizer files by name; a FIFO there would block it, a device or ``/proc`` link
    would feed it garbage)."""
    if not is_thawed_folder(folder):
        raise CheckpointNotFoundError(
            f"{folder} has neither {MARKER_FILE} nor {PAYLOAD_FILE}, so it is not a thawed checkpoint; "
            "create one with `thawed compress`"
        )
    if not os.path.lexists(folder / PAYLOAD_FILE):
        raise CheckpointNotFoundError(
            f"{folder} has the thawed marker {MARKER_FILE} but no {PAYLOAD_FILE}: the checkpoint is incomplete; {_FIX}"
        )
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise CheckpointNotFoundError(f"{folder} cannot be listed ({exc.strerror or exc}); check its permissions") from None
    for entry in entries:
        if entry.name == PAYLOAD_FILE or _is_dir(entry):
            continue  # the payload gets its own, more specific message from the reader
        problem = special_file_problem(entry.path)
        if problem:
            raise CheckpointNotFoundError(f"{entry.path} {problem}; a checkpoint folder holds regular files only; {_FIX}")
    if os.path.lexists(folder / MARKER_FILE):
        try:
            marker = read_json_file(folder / MARKER_FILE, MARKER_FILE, max_depth=4)
        except ValueError as exc:
            raise CheckpointNotFoundError(f"{folder / MARKER_FILE}: {exc}; {_FIX}") from None
        if not isinstance(marker, dict) or marker.get("format") != FORMAT_NAME:
            raise CheckpointNotFoundError(
                f"{folder / MARKER_FILE} does not say format {FORMAT_NAME!r}; it is not thawed's marker; {_FIX}"
            )


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False
