"""Rate–distortion chart from the quality benchmark's JSON: perplexity against bits per weight, one
line per codec, dense as a horizontal line, one panel per evaluation domain.

    python benchmarks/plot_rd.py out/quality.json --out docs/img/rd_smollm2.png [--bpw file|linear]

Input, either of:
- the JSON ``benchmarks/quality_ckpts.py --json-out`` writes here (``rows`` of label, codec, bpw_linear,
  bpw_file, domain, perplexity; the dense rows have codec ``dense``);
- JSON lines, one result per line, as the two-domain quality benchmark of the calibration work
  writes them (``{"row": "cvxq4.25-self", "corpus": "pydoc", "file_bpw": .., "perplexity": ..,
  "protocol": ..}``; ``"stage": "compress"`` lines add ``linear_bpw``); the codec is the row name's
  leading letters (``rtn4-gptq`` -> rtn), ``dense`` is dense.
Several files may be given; their rows are pooled (the domains' protocols are checked to agree).
Needs matplotlib: ``pip install -e .[report]``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

MARKERS = {"rtn": "o", "nwc": "D", "cvxq": "s", "hyperc": "^", "see": "v", "lossless": "P"}
COLOURS = {"rtn": "#c44e52", "nwc": "#4c72b0", "cvxq": "#55a868", "hyperc": "#8172b3", "see": "#937860",
           "lossless": "#8c8c8c"}


def _from_json_lines(p: Path, text: str) -> dict:
    """The JSON-lines records of ``benchmarks/quality.py`` (one line per row and corpus), as a
    ``quality_ckpts.py`` document."""
    recs = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{p}:{i}: not JSON ({exc}); give the benchmark's JSON or JSON-lines file") from None
    linear = {r["row"]: r.get("linear_bpw") for r in recs if r.get("stage") == "compress"}
    rows, domains = [], {}
    for r in recs:
        if "row" not in r or "corpus" not in r or "perplexity" not in r:
            continue
        name = r["row"]
        codec = "dense" if name == "dense" else re.match(r"[a-z]*", name).group(0) or name
        bpw = 32.0 if codec == "dense" else r["file_bpw"]
        rows.append({"label": name, "codec": codec, "domain": r["corpus"], "perplexity": r["perplexity"],
                     "bpw_file": bpw, "bpw_linear": 32.0 if codec == "dense" else linear.get(name) or bpw})
        domains.setdefault(r["corpus"], r.get("protocol", r["corpus"]))
    cmd = next((r["command"] for r in recs if "command" in r), str(p))
    return {"rows": rows, "domains": domains, "command": cmd}


def load_rows(paths: list[Path]) -> tuple[list[dict], dict[str, str], list[str]]:
    rows, protocols, commands = [], {}, []
    for p in paths:
        text = p.read_text()
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = _from_json_lines(p, text)
        if isinstance(doc, dict) and "row" in doc:  # a JSON-lines file of one line
            doc = _from_json_lines(p, text)
        if not isinstance(doc, dict) or "rows" not in doc or "domains" not in doc:
            raise SystemExit(f"{p}: not the JSON of benchmarks/quality_ckpts.py (no 'rows'/'domains') nor the JSON lines of "
                             "benchmarks/quality.py; run either with --json-out FILE first")
        for d, proto in doc["domains"].items():
            if protocols.setdefault(d, proto) != proto:
                raise SystemExit(f"{p}: domain {d!r} was measured with another protocol ({proto!r} vs "
                                 f"{protocols[d]!r}); plot files of one protocol together")
        rows.extend(doc["rows"])
        commands.append(doc.get("command", str(p)))
    return rows, protocols, commands


def check(rows: list[dict], domains: list[str]) -> None:
    """Correctness first: one dense row per domain, finite positive perplexities, bpw in range."""
    for d in domains:
        dense = [r for r in rows if r["domain"] == d and r["codec"] == "dense"]
        if len(dense) != 1:
            raise SystemExit(f"domain {d!r}: expected one dense row, found {len(dense)}")
    for r in rows:
        if not (r["perplexity"] > 1 and r["perplexity"] < 1e7):
            raise SystemExit(f"{r['label']} on {r['domain']}: perplexity {r['perplexity']} is not a number to plot")
        if r["codec"] != "dense" and not 0 < r["bpw_file"] < 32:
            raise SystemExit(f"{r['label']}: {r['bpw_file']} bits/weight is out of range")


def plot(rows: list[dict], protocols: dict[str, str], out: Path, bpw_key: str, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(protocols)
    fig, axes = plt.subplots(1, len(domains), figsize=(6.2 * len(domains), 4.6), squeeze=False)
    for ax, d in zip(axes[0], domains):
        here = [r for r in rows if r["domain"] == d]
        dense = next(r for r in here if r["codec"] == "dense")
        ax.axhline(dense["perplexity"], color="black", ls="--", lw=1.2, label=f"dense fp32 ({dense['perplexity']:.2f})")
        for codec in sorted({r["codec"] for r in here} - {"dense"}):
            pts = sorted((r for r in here if r["codec"] == codec), key=lambda r: r[bpw_key])
            xs, ys = [r[bpw_key] for r in pts], [r["perplexity"] for r in pts]
            ax.plot(xs, ys, marker=MARKERS.get(codec, "o"), color=COLOURS.get(codec), lw=1.5, ms=7, label=codec)
            for r in pts:
                ax.annotate(f"{r['label']}\n{r['perplexity']:.1f}", (r[bpw_key], r["perplexity"]),
                            textcoords="offset points", xytext=(6, 4), fontsize=7.5, color=COLOURS.get(codec, "#333"))
        ax.set_yscale("log")
        xs_all = [r[bpw_key] for r in here if r["codec"] != "dense"] or [4.0]
        lo, hi = min(xs_all), max(xs_all)
        pad = max(0.3, (hi - lo) * 0.15)
        ax.set_xlim(lo - pad, hi + pad * 2.2)  # room on the right for the labels
        ys_all = [r["perplexity"] for r in here]
        ax.set_ylim(min(ys_all) * 0.8, max(ys_all) * 2.0)
        ax.set_xlabel(f"bits per weight ({'whole file' if bpw_key == 'bpw_file' else 'linear layers'})")
        ax.set_ylabel("perplexity (log scale, lower is better)")
        ax.set_title(protocols[d].split(":")[0] + f" — {_domain_words(d)}", fontsize=11)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("SmolLM2-135M: perplexity vs bits per weight", fontsize=12)
    fig.text(0.01, 0.01, caption, fontsize=7, color="#555", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _domain_words(d: str) -> str:
    return {"ptb-test": "English news (Penn Treebank test)",
            "code-stdlib": "Python source (stdlib argparse, difflib, textwrap)",
            "pydoc": "Python documentation (pydoc topics)"}.get(d, d)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", type=Path, help="quality benchmark JSON file(s)")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    ap.add_argument("--bpw", choices=["file", "linear"], default="file")
    args = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401  (an early, clear error without it)
    except ImportError:
        raise SystemExit("benchmarks/plot_rd.py needs matplotlib: pip install -e '.[report]'") from None
    rows, protocols, commands = load_rows(args.json)
    check(rows, list(protocols))
    protocol = "; ".join(p.split(": ", 1)[1] for p in list(protocols.values())[:1])
    caption = (" + ".join(dict.fromkeys(commands)) + f"\n{protocol}  |  chart: python benchmarks/plot_rd.py "
               f"{' '.join(map(str, args.json))} --out {args.out}")
    plot(rows, protocols, args.out, "bpw_file" if args.bpw == "file" else "bpw_linear", caption)
    n = sum(1 for r in rows if r["codec"] != "dense")
    print(f"wrote {args.out}: {n} points over {len(protocols)} domains")
    return 0


if __name__ == "__main__":
    sys.exit(main())
