"""One self-contained HTML page from ``ReportData``: inline SVG charts and CSS, no script, no link
to anything outside the file, so it opens the same offline, in a mail attachment or a CI artefact."""

from __future__ import annotations

import json
import math
from html import escape
from typing import Any

from .data import ReportData, TensorRow
from .svg import heatmap, stacked_bars

__all__ = ["render_html"]

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 32px; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; } .figure { overflow-x: auto; margin: 8px 0 4px; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 2px 10px; border-bottom: 1px solid #eee; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: 10px; overflow-x: auto; font-size: 12px; max-height: 360px; }
.kpi { display: inline-block; margin: 6px 24px 6px 0; } .kpi b { display: block; font-size: 20px; }
.note { color: #666; font-size: 12px; }
"""


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**17 else f"{n / 1024:.1f} KiB"


def _short(kinds: list[str]) -> list[str]:
    """``self_attn.q_proj`` -> ``q_proj`` where the last part is unique among the columns."""
    last = [k.rsplit(".", 1)[-1] for k in kinds]
    return [s if last.count(s) == 1 else k for s, k in zip(last, kinds)]


def _db(v: float | None) -> str:
    if v is None:
        return "—"
    if math.isinf(v):
        return "∞ (exact)" if v > 0 else "−∞"
    return f"{v:.2f}"


def _table(head: list[str], rows: list[list[str]], num: set[int]) -> str:
    th = "".join(f'<th class="num">{escape(h)}</th>' if i in num else f"<th>{escape(h)}</th>"
                 for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="num">{escape(c)}</td>' if i in num else f"<td>{escape(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _codec_settings(data: ReportData) -> list[list[str]]:
    """One row per codec: its tensor count, the params every one of its tensors shares, and for
    params that vary per tensor (a planned rate, a payload length) their range."""
    by_codec: dict[str, list[dict[str, Any]]] = {}
    for t in data.tensors:
        by_codec.setdefault(t.codec, []).append(t.params)
    rows = []
    for codec, plist in sorted(by_codec.items(), key=lambda kv: -len(kv[1])):
        keys = sorted({k for p in plist for k in p})
        same, varying = [], []
        for k in keys:
            vals = [p.get(k) for p in plist]
            if any(isinstance(v, (list, dict)) for v in vals):
                varying.append(f"{k}: per tensor")
                continue
            distinct = set(map(json.dumps, vals))
            if len(distinct) == 1:
                same.append(f"{k}={vals[0]}")
            elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                fmt = (lambda v: f"{v:,}") if all(isinstance(v, int) for v in vals) else (lambda v: f"{v:.4g}")
                varying.append(f"{k} {fmt(min(vals))}–{fmt(max(vals))}")
            else:
                varying.append(f"{k}: {len(distinct)} values")
        rows.append([codec, str(len(plist)), ", ".join(same) or "—", "; ".join(varying) or "—"])
    return rows


def _settings_text(settings: Any) -> str:
    text = json.dumps(settings, indent=1, sort_keys=True, default=str)
    limit = 6000
    return text if len(text) <= limit else text[:limit] + f"\n… ({len(text) - limit:,} more characters: `thawed inspect --json`)"


def render_html(data: ReportData, title: str | None = None) -> str:
    kinds = data.kinds
    layers = data.layers
    cols = _short(kinds)
    rows_lbl = [str(i) for i in layers]
    by_cell: dict[tuple[int, int], TensorRow] = {}
    kind_pos = {k: j for j, k in enumerate(kinds)}
    layer_pos = {layer: i for i, layer in enumerate(layers)}
    for t in data.tensors:
        if t.layer is not None and t.kind in kind_pos:
            by_cell[(layer_pos[t.layer], kind_pos[t.kind])] = t

    def tip(i: int, j: int) -> str:
        t = by_cell.get((i, j))
        return f"{t.name} [{t.codec}, {t.bytes:,} B]" if t else ""

    parts: list[str] = []
    title = title or f"thawed report: {data.path}"
    parts.append(f"<h1>{escape(title)}</h1>")
    parts.append(f'<p class="sub">{escape(data.path)} · source {escape(str(data.source))}</p>')
    tot, lin = data.total, data.linear
    kpis = [("whole file", f"{tot['bpw']:.3f} bits/weight"), ("linear layers", f"{lin['bpw']:.3f} bits/weight"),
            ("file size", _mib(tot["file_bytes"])), ("vs bf16", f"{tot['ratio_to_bf16']:.2f}× smaller"),
            ("weights", f"{tot['weights']:,}")]
    coded = [t for t in data.tensors if t.codec != "raw" and t.sqnr_db is not None]
    if coded:
        finite = [t.sqnr_db for t in coded if math.isfinite(t.sqnr_db)]
        if finite:
            kpis.append(("median SQNR", f"{sorted(finite)[len(finite) // 2]:.2f} dB"))
    parts.append("<div>" + "".join(f'<span class="kpi">{escape(k)}<b>{escape(v)}</b></span>' for k, v in kpis)
                 + "</div>")

    parts.append("<h2>Bits per weight, layer × tensor type</h2>")
    if kinds:
        parts.append('<div class="figure">' + heatmap(
            data.grid(lambda t: t.bpw), rows_lbl, cols, name="bpw-heatmap",
            title="bits per weight (codes and side information)", unit="bits/weight",
            fmt=lambda v: f"{v:.2f}", tooltip=tip, min_span=1.0) + "</div>")
    else:
        parts.append("<p>No coded tensor inside numbered layers.</p>")
    outside = data.outside()
    if outside:
        parts.append("<p>Outside the layers:</p>" + _table(
            ["tensor", "codec", "role", "shape", "bytes", "bits/weight", "SQNR dB"],
            [[t.name, t.codec, t.role, "×".join(map(str, t.shape)), f"{t.bytes:,}", f"{t.bpw:.3f}", _db(t.sqnr_db)]
             for t in outside], {4, 5, 6}))

    parts.append("<h2>Bytes by codec and role</h2>")
    bars = [(codec, sorted(roles.items(), key=lambda kv: -kv[1]))
            for codec, roles in sorted(data.bytes_by_codec_role.items(), key=lambda kv: -sum(kv[1].values()))]
    if data.shared_bytes:
        bars.append(("shared state", [(f"{codec} shared state", float(n)) for codec, n in
                                      sorted(data.shared_bytes.items(), key=lambda kv: -kv[1])]))
    bars.append(("header", [("header", float(data.header_bytes))]))
    parts.append('<div class="figure">' + stacked_bars(bars, name="bytes-by-codec", title="payload bytes",
                                                       fmt=_mib) + "</div>")

    parts.append("<h2>Weight SQNR against the source</h2>")
    if data.against is None:
        parts.append("<p>Not measured: run <code>thawed report CKPT --against SRC</code> with the model the "
                     "checkpoint was compressed from.</p>")
    else:
        parts.append(f'<p class="sub">against {escape(data.against)}: each tensor decoded on the CPU and compared '
                     f"with the source's, 10·log10(Σw² / Σ(w−ŵ)²); higher is better "
                     f"({data.sqnr_seconds:.1f} s).</p>")
        if kinds:
            parts.append('<div class="figure">' + heatmap(
                data.grid(lambda t: t.sqnr_db), rows_lbl, cols, name="sqnr-heatmap",
                title="weight SQNR (dB), layer × tensor type", unit="dB", fmt=lambda v: f"{v:.1f}",
                tooltip=tip, min_span=3.0) + "</div>")
        worst = sorted((t for t in coded if t.sqnr_db is not None), key=lambda t: t.sqnr_db)[:12]
        parts.append("<p>Lowest SQNR (the tensors that lose the most):</p>" + _table(
            ["tensor", "codec", "bits/weight", "SQNR dB"],
            [[t.name, t.codec, f"{t.bpw:.3f}", _db(t.sqnr_db)] for t in worst], {2, 3}))

    parts.append("<h2>Codec settings and source</h2>")
    parts.append(_table(["codec", "tensors", "params shared by its tensors", "params planned per tensor (range)"],
                        _codec_settings(data), {1}))
    parts.append(f"<p>Source recorded in the checkpoint: <code>{escape(str(data.source))}</code></p>")
    parts.append(f"<pre>{escape(_settings_text(data.settings))}</pre>")
    parts.append('<p class="note">Made by <code>thawed report</code>. Bits per weight count every payload byte of '
                 "a tensor (codes and side information); the whole-file figure also counts shared codec state and "
                 "the header. Hover a cell for its tensor name and exact figure.</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
            f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
