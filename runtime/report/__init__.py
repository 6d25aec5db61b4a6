"""``thawed report``: where a checkpoint's bits went, as one self-contained HTML page.

``collect_report`` (data.py) gathers the figures, ``render_html`` (html.py) draws them as inline
SVG (svg.py). Offline tooling: the serving path never imports this package.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from thawed.codecs.errors import ThawedError

from ..checkpoint import Checkpoint
from .data import ReportData, TensorRow, collect_report, sqnr_db, split_layer
from .html import render_html

__all__ = ["write_report", "collect_report", "render_html", "ReportData", "TensorRow", "sqnr_db", "split_layer"]

log = logging.getLogger(__name__)


def write_report(ckpt_path: str | Path, out: str | Path, against: str | Path | None = None,
                 progress: Callable[[int, int, str], None] | None = None) -> ReportData:
    """Open ``ckpt_path``, gather its report (SQNR against ``against`` when given) and write the
    HTML page to ``out``. Returns the data drawn."""
    out = Path(out)
    if out.is_dir():
        raise ThawedError(f"--out {out} is a directory; give a file name such as {out / 'report.html'}")
    if not out.parent.is_dir():
        raise ThawedError(f"--out {out}: folder {out.parent} does not exist; create it first")
    with Checkpoint.open(ckpt_path) as ckpt:
        data = collect_report(ckpt, against=against, progress=progress)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render_html(data), encoding="utf-8")
    tmp.replace(out)
    log.info("wrote %s", out)
    return data
