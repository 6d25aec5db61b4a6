"""benchmarks/quality_ckpts.py (dense + checkpoints on two domains, JSON) and benchmarks/plot_rd.py (the
rate-distortion PNG) end to end on the tiny Llama, and the checks that make them refuse bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from models_fixtures import tiny_llama_dir  # noqa: F401

from thawed.runtime.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def quality_json(tiny_llama_dir, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("quality")
    ckpts = []
    for label, codec in (("rtn3", "rtn:bits=3,group_size=32"), ("rtn4", "rtn:bits=4,group_size=32"),
                         ("rtn8", "rtn:bits=8,group_size=32")):
        assert main(["compress", str(tiny_llama_dir), str(work / label), "--codec", codec, "--no-progress"]) == 0
        ckpts += ["--ckpt", f"{label}={work / label}"]
    out = work / "quality.json"
    r = run("quality_ckpts.py", "--src", str(tiny_llama_dir), *ckpts, "--tokens", "96", "--ctx", "32", "--threads", "1",
            "--json-out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_quality_json(quality_json, tiny_llama_dir):
    doc = json.loads(quality_json.read_text())
    assert set(doc["domains"]) == {"ptb-test", "code-stdlib"}
    assert doc["command"].startswith("python benchmarks/quality_ckpts.py") and doc["source"] == str(tiny_llama_dir)
    rows = {(r["label"], r["domain"]): r for r in doc["rows"]}
    assert len(rows) == 4 * 2
    for d in doc["domains"]:
        assert rows[("dense", d)]["codec"] == "dense"
        assert rows[("rtn8", d)]["bpw_file"] > rows[("rtn4", d)]["bpw_file"] > rows[("rtn3", d)]["bpw_file"]
        # 8 bits is all but exact: its perplexity is within 2 % of dense; 3 bits is further away
        dense = rows[("dense", d)]["perplexity"]
        assert abs(rows[("rtn8", d)]["perplexity"] / dense - 1) < 0.02
        assert abs(rows[("rtn3", d)]["perplexity"] / dense - 1) > abs(rows[("rtn8", d)]["perplexity"] / dense - 1)
    assert all(c["probe_sqnr_db"] > 5 for c in doc["checks"].values())


def test_quality_refuses_a_checkpoint_of_another_model(tiny_llama_dir, tmp_path):
    from models_fixtures import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", seed=7)  # same shapes, other weights
    assert main(["compress", str(other), str(tmp_path / "c"), "--codec", "rtn:bits=4,group_size=32",
                 "--no-progress"]) == 0
    r = run("quality_ckpts.py", "--src", str(tiny_llama_dir), "--ckpt", f"x={tmp_path / 'c'}", "--tokens", "64",
            "--ctx", "32")
    assert r.returncode != 0 and "not compressed from this source" in r.stderr


def test_plot_rd_writes_the_png(quality_json, tmp_path):
    pytest.importorskip("matplotlib", reason="benchmarks/plot_rd.py needs the report extra: pip install -e '.[report]'")
    png = tmp_path / "rd.png"
    r = run("plot_rd.py", str(quality_json), "--out", str(png))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "6 points over 2 domains" in r.stdout  # 3 checkpoints x 2 domains; dense drawn as a line
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    img = imread(str(png))
    assert img.shape[1] > 1000 and img.shape[0] > 400
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_plot_rd_refuses_bad_input(quality_json, tmp_path):
    pytest.importorskip("matplotlib", reason="benchmarks/plot_rd.py needs the report extra: pip install -e '.[report]'")
    doc = json.loads(quality_json.read_text())
    no_dense = dict(doc, rows=[r for r in doc["rows"] if r["codec"] != "dense"])
    (tmp_path / "a.json").write_text(json.dumps(no_dense))
    r = run("plot_rd.py", str(tmp_path / "a.json"), "--out", str(tmp_path / "a.png"))
    assert r.returncode != 0 and "expected one dense row" in r.stderr and not (tmp_path / "a.png").exists()
    (tmp_path / "b.json").write_text(json.dumps({"rows": []}))
    r = run("plot_rd.py", str(tmp_path / "b.json"), "--out", str(tmp_path / "b.png"))
    assert r.returncode != 0 and "not the JSON of benchmarks/quality_ckpts.py" in r.stderr


def test_plot_rd_reads_json_lines_too(tmp_path):
    """The per-result JSON-lines records of the calibration work's two-domain quality benchmark."""
    pytest.importorskip("matplotlib", reason="benchmarks/plot_rd.py needs the report extra: pip install -e '.[report]'")
    proto = {"ptb-test": "ptb-test: first 64 tokens, no BOS, window 32, stride 16",
             "pydoc": "pydoc: first 64 tokens, no BOS, window 32, stride 16"}
    recs = [{"row": "rtn4", "stage": "compress", "command": "python benchmarks/quality_ckpts.py --rows dense,rtn4",
             "linear_bpw": 4.27, "file_bpw": 4.29}]
    for corpus in proto:
        recs += [{"row": "dense", "corpus": corpus, "file_bpw": 32.0, "perplexity": 40.0, "protocol": proto[corpus]},
                 {"row": "rtn4", "corpus": corpus, "file_bpw": 4.29, "perplexity": 80.0, "protocol": proto[corpus]},
                 {"row": "cvxq4.25-self", "corpus": corpus, "file_bpw": 4.25, "perplexity": 50.0,
                  "protocol": proto[corpus]}]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    r = run("plot_rd.py", str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "q.png"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "4 points over 2 domains" in r.stdout and (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"


def test_the_docs_chart_is_made_from_the_committed_json(tmp_path):
    """docs/img/rd_smollm2.png is reproducible from docs/data/*.json, which hold dense and the
    nwc 4.25 / cvxq 3.25 / rtn points on both domains, and docs/REPORT.md shows it."""
    pytest.importorskip("matplotlib", reason="benchmarks/plot_rd.py needs the report extra: pip install -e '.[report]'")
    data = [ROOT / "docs/data/quality-smollm2.json", ROOT / "docs/data/quality-smollm2-cvxq.json"]
    rows = [r for p in data for r in json.loads(p.read_text())["rows"]]
    assert {(r["codec"], r["domain"]) for r in rows} == {(c, d) for c in ("dense", "rtn", "nwc", "cvxq")
                                                         for d in ("ptb-test", "code-stdlib")}
    r = run("plot_rd.py", *map(str, data), "--out", str(tmp_path / "rd.png"))
    assert r.returncode == 0 and "8 points over 2 domains" in r.stdout, r.stderr[-2000:]
    assert (ROOT / "docs/img/rd_smollm2.png").read_bytes()[:4] == b"\x89PNG"
    assert "![perplexity vs bits per weight" in (ROOT / "docs/REPORT.md").read_text()
