"""benchmarks/rd_table.py --table-only: the whole table from the JSON lines of several invocations, and its
refusal when those invocations measured different dense perplexities (their rows would not be comparable)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _lines(path: Path, dense_ptb: float) -> None:
    recs = [{"row": "dense", "corpus": "ptb-test", "file_bpw": 32.0, "perplexity": 40.0},
            {"row": "dense", "corpus": "pydoc", "file_bpw": 32.0, "perplexity": 10.0},
            {"row": "rtn@4.25", "stage": "compress", "file_bpw": 4.29},
            {"row": "rtn@4.25", "corpus": "ptb-test", "file_bpw": 4.288, "perplexity": 60.0},
            {"row": "rtn@4.25", "corpus": "pydoc", "file_bpw": 4.288, "perplexity": 13.0},
            # a second invocation (--cells): dense again, then another cell
            {"row": "dense", "corpus": "ptb-test", "file_bpw": 32.0, "perplexity": dense_ptb},
            {"row": "dense", "corpus": "pydoc", "file_bpw": 32.0, "perplexity": 10.0},
            {"row": "nwc@2.5", "corpus": "ptb-test", "file_bpw": 2.5, "perplexity": 80.0},
            {"row": "nwc@2.5", "corpus": "pydoc", "file_bpw": 2.5, "perplexity": 25.0},
            {"part": "minilm_sqnr", "codec": "rtn", "rate": 4.25, "bpw": 4.27, "sqnr_db": 20.5, "sqnr_db_layer5": 20.1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def _run(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rd_table.py"), "--table-only", "--json-out",
                           str(path)], capture_output=True, text=True, timeout=120)


def test_table_merges_invocations(tmp_path):
    path = tmp_path / "results.jsonl"
    _lines(path, 40.0)
    r = _run(path)
    assert r.returncode == 0, r.stderr
    rows = {line.split("|")[1].strip() + "@" + line.split("|")[2].strip(): line for line in r.stdout.splitlines()
            if line.startswith("| ") and line.count("|") == 9}
    assert "×1.500" in rows["rtn@4.25"] and "×1.300" in rows["rtn@4.25"] and "| 0.60 |" in rows["rtn@4.25"]
    assert "×2.000" in rows["nwc@2.5"] and "×2.500" in rows["nwc@2.5"]
    assert "not measured" in rows["hyperc@3.25"]
    assert "| rtn | 4.25 | 4.270 | 20.50 | 20.10 |" in r.stdout


def test_table_refuses_disagreeing_dense(tmp_path):
    path = tmp_path / "results.jsonl"
    _lines(path, 41.0)
    r = _run(path)
    assert r.returncode != 0 and "different dense perplexities" in r.stderr


def test_calibration_sources_section(tmp_path):
    """--calib-compare's rows (``cell+ptb-train``, ``cell+text``) print beside the cell's own (self-calibrated) row."""
    path = tmp_path / "results.jsonl"
    _lines(path, 40.0)
    extra = [{"row": "cvxq@4.25", "corpus": "ptb-test", "file_bpw": 4.25, "perplexity": 48.0},
             {"row": "cvxq@4.25", "corpus": "pydoc", "file_bpw": 4.25, "perplexity": 11.0},
             {"row": "cvxq@4.25+ptb-train", "corpus": "ptb-test", "file_bpw": 4.25, "perplexity": 44.0},
             {"row": "cvxq@4.25+ptb-train", "corpus": "pydoc", "file_bpw": 4.25, "perplexity": 12.0},
             {"row": "cvxq@4.25+text", "corpus": "ptb-test", "file_bpw": 4.25, "perplexity": 50.0},
             {"row": "cvxq@4.25+text", "corpus": "pydoc", "file_bpw": 4.25, "perplexity": 12.5}]
    with path.open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in extra))
    r = _run(path)
    assert r.returncode == 0, r.stderr
    section = r.stdout.split("Calibration sources, cvxq@4.25")[1]
    assert "| self-generated (default) | 4.250 | 48.00 | ×1.200 | 11.00 | ×1.100 | 0.50 |" in section
    assert "| PTB train | 4.250 | 44.00 | ×1.100 | 12.00 | ×1.200 | 2.00 |" in section
    assert "| --calib-text | 4.250 | 50.00 | ×1.250 | 12.50 | ×1.250 | 1.00 |" in section
    assert "cvxq+ptb" not in r.stdout and "| cvxq | 4.25 | 4.250 | 48.00 |" in r.stdout  # the main table keeps one row
