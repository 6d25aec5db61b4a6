"""Plain inline SVG for the report: a heat map with a colour bar and a stacked horizontal bar chart.

Written by hand rather than with matplotlib so ``thawed report`` needs no extra package, the page
stays small and vector (sharp at any zoom, text selectable), and every cell carries a ``<title>``
tooltip with its exact figure. Every chart is an ``<svg class="chart">`` with a ``data-chart`` name
and ``data-marks`` (its number of drawn marks), which the browser test checks against the page.
"""

from __future__ import annotations

import math
from html import escape
from typing import Callable, Sequence

__all__ = ["heatmap", "stacked_bars", "colour", "VIRIDIS"]

# matplotlib's viridis at 9 evenly spaced points (perceptually uniform, readable in grey and by
# colour-blind readers); values between are interpolated linearly in RGB.
VIRIDIS = ("#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725")
SEGMENT_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
_FONT = 'font-family="system-ui, sans-serif"'


def colour(t: float) -> str:
    """Viridis at ``t`` in [0, 1] (clamped)."""
    t = min(1.0, max(0.0, t)) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    f = t - i
    a, b = VIRIDIS[i], VIRIDIS[i + 1]
    rgb = [round(int(a[k:k + 2], 16) * (1 - f) + int(b[k:k + 2], 16) * f) for k in (1, 3, 5)]
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _text_colour(t: float) -> str:
    return "#000" if t > 0.55 else "#fff"


def heatmap(grid: Sequence[Sequence[float | None]], row_labels: Sequence[str], col_labels: Sequence[str], *,
            name: str, title: str, unit: str, fmt: Callable[[float], str],
            tooltip: Callable[[int, int], str] | None = None, min_span: float = 0.0, row_axis: str = "layer",
            cell_w: int = 64, cell_h: int = 16) -> str:
    """A rows x columns grid of coloured cells, the value printed in each, a colour bar beside.

    ``None`` cells are drawn hatched grey (no such tensor); infinite values (lossless) take the top
    colour and print as ``∞``. The colour scale spans the finite values, widened symmetrically to
    at least ``min_span`` so that near-equal values do not look like opposite ends of the scale."""
    finite = [v for row in grid for v in row if v is not None and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi - lo < min_span:
        mid = (hi + lo) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
    span = (hi - lo) or 1.0
    left, top = 44, 58
    width = left + cell_w * len(col_labels) + 110
    height = top + cell_h * len(row_labels) + 12
    out = [f'<svg class="chart" data-chart="{escape(name)}" xmlns="http://www.w3.org/2000/svg" '
           f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" {_FONT} font-size="11">',
           f'<text x="0" y="14" font-size="14" font-weight="600">{escape(title)}</text>']
    out.append(f'<text x="{left - 6}" y="{top - 6}" text-anchor="end" fill="#666">{escape(row_axis)}</text>')
    for j, label in enumerate(col_labels):
        x = left + j * cell_w + cell_w / 2
        out.append(f'<text x="{x:.1f}" y="{top - 6}" text-anchor="middle">{escape(label)}</text>')
    marks = 0
    for i, row in enumerate(grid):
        y = top + i * cell_h
        out.append(f'<text x="{left - 6}" y="{y + cell_h - 4}" text-anchor="end">{escape(row_labels[i])}</text>')
        for j, v in enumerate(row):
            x = left + j * cell_w
            if v is None:
                out.append(f'<rect x="{x}" y="{y}" width="{cell_w - 1}" height="{cell_h - 1}" fill="#eee"/>')
                continue
            t = 1.0 if not math.isfinite(v) and v > 0 else 0.0 if not math.isfinite(v) else (v - lo) / span
            tip = tooltip(i, j) if tooltip else f"{row_labels[i]} {col_labels[j]}"
            label = "∞" if math.isinf(v) and v > 0 else fmt(v)
            out.append(f'<rect class="cell" x="{x}" y="{y}" width="{cell_w - 1}" height="{cell_h - 1}" '
                       f'fill="{colour(t)}"><title>{escape(tip)}: {escape(label)} {escape(unit)}</title></rect>')
            out.append(f'<text x="{x + cell_w / 2:.1f}" y="{y + cell_h - 4}" text-anchor="middle" '
                       f'fill="{_text_colour(t)}" pointer-events="none">{escape(label)}</text>')
            marks += 1
    # colour bar
    bx, bh = left + cell_w * len(col_labels) + 16, max(60, cell_h * len(row_labels))
    steps = 32
    for k in range(steps):
        t = 1 - k / (steps - 1)
        out.append(f'<rect x="{bx}" y="{top + k * bh / steps:.1f}" width="14" height="{bh / steps + 0.5:.1f}" '
                   f'fill="{colour(t)}"/>')
    out.append(f'<text x="{bx + 18}" y="{top + 9}">{escape(fmt(hi))}</text>')
    out.append(f'<text x="{bx + 18}" y="{top + bh}">{escape(fmt(lo))}</text>')
    out.append(f'<text x="{bx}" y="{top - 6}">{escape(unit)}</text>')
    out.append("</svg>")
    out[0] = out[0].replace('class="chart"', f'class="chart" data-marks="{marks}"', 1)
    return "\n".join(out)


def stacked_bars(bars: Sequence[tuple[str, Sequence[tuple[str, float]]]], *, name: str, title: str,
                 fmt: Callable[[float], str], width: int = 760, bar_h: int = 22) -> str:
    """One horizontal bar per label, split into named segments, drawn to a common scale; a legend
    for the segment names below."""
    seg_names: list[str] = []
    for _, segs in bars:
        for s, _v in segs:
            if s not in seg_names:
                seg_names.append(s)
    colours = {s: SEGMENT_COLOURS[i % len(SEGMENT_COLOURS)] for i, s in enumerate(seg_names)}
    total_max = max((sum(v for _, v in segs) for _, segs in bars), default=0.0) or 1.0
    left, top, plot_w = 120, 28, width - 120 - 110
    height = top + len(bars) * (bar_h + 8) + 30
    out = [f'<svg class="chart" data-chart="{escape(name)}" xmlns="http://www.w3.org/2000/svg" '
           f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" {_FONT} font-size="11">',
           f'<text x="0" y="14" font-size="14" font-weight="600">{escape(title)}</text>']
    marks = 0
    for i, (label, segs) in enumerate(bars):
        y = top + i * (bar_h + 8)
        out.append(f'<text x="{left - 6}" y="{y + bar_h / 2 + 4}" text-anchor="end">{escape(label)}</text>')
        x = float(left)
        for s, v in segs:
            w = plot_w * v / total_max
            out.append(f'<rect class="bar" x="{x:.2f}" y="{y}" width="{max(w, 0.5):.2f}" height="{bar_h}" '
                       f'fill="{colours[s]}"><title>{escape(label)} · {escape(s)}: {escape(fmt(v))}</title></rect>')
            x += w
            marks += 1
        out.append(f'<text x="{x + 6:.2f}" y="{y + bar_h / 2 + 4}">{escape(fmt(sum(v for _, v in segs)))}</text>')
    ly = top + len(bars) * (bar_h + 8) + 10
    lx = float(left)
    for s in seg_names:
        out.append(f'<rect x="{lx:.1f}" y="{ly}" width="10" height="10" fill="{colours[s]}"/>')
        out.append(f'<text x="{lx + 14:.1f}" y="{ly + 9}">{escape(s)}</text>')
        lx += 24 + 7 * len(s)
    out.append("</svg>")
    out[0] = out[0].replace('class="chart"', f'class="chart" data-marks="{marks}"', 1)
    return "\n".join(out)
