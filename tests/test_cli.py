"""The ``thawed`` command line on a tiny model: compress, inspect, generate, eval, and clean errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from models_fixtures import tiny_llama_dir  # noqa: F401

from thawed.runtime.cli import main


@pytest.fixture(scope="module")
def ckpt(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ck"
    assert main(["compress", str(tiny_llama_dir), str(out), "--codec", "rtn:bits=4,group_size=32",
                 "--codec-for", "*.down_proj.weight=rtn:bits=8,group_size=32", "--no-progress"]) == 0
    return out


def test_inspect_json_counts_every_byte(ckpt, capsys):
    assert main(["inspect", str(ckpt), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in rep["tensors"]}
    q = rows["model.layers.0.self_attn.q_proj.weight"]
    assert q["codec"] == "rtn" and q["role"] == "linear"
    assert q["bpw"] == pytest.approx(4 + 32 / 32)  # codes + f16 scale and offset per group of 32
    assert rows["model.layers.0.mlp.down_proj.weight"]["bpw"] == pytest.approx(8 + 32 / 32)
    assert rows["model.norm.weight"]["codec"] == "raw" and rows["model.norm.weight"]["bpw"] == 32
    total = rep["total"]
    assert total["file_bytes"] >= total["tensor_bytes"]
    assert total["bpw"] == pytest.approx(total["file_bytes"] * 8 / total["weights"], rel=1e-4)
    assert rep["linear"]["bpw"] > 5 and rep["linear"]["bpw"] < 9


def test_inspect_table(ckpt, capsys):
    assert main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.up_proj.weight" in out and "linear layers:" in out and "bf16" in out


def test_generate_and_eval(ckpt, tiny_llama_dir, tmp_path, capsys):
    assert main(["generate", str(ckpt), "the capital of", "--max-new-tokens", "4", "--stats"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("the capital of")
    stats = json.loads(cap.err.strip().splitlines()[-1])
    assert stats["new_tokens"] >= 1 and stats["cache"]["decodes"] > 0
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the king of england is in london and the queen is in paris"] * 30))
    for model in (ckpt, tiny_llama_dir):
        assert main(["eval", str(model), "--text-file", str(text), "--tokens", "200", "--ctx", "64", "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["scored_tokens"] == 199 and res["perplexity"] > 1
        assert res["kind"] == ("thawed" if model == ckpt else "dense")


def test_errors_are_one_line_and_exit_2(tiny_llama_dir, tmp_path, capsys):
    cases = [
        ["compress", str(tiny_llama_dir), str(tmp_path / "x"), "--codec", "nosuch"],
        ["compress", str(tiny_llama_dir), str(tmp_path / "y"), "--codec", "rtn:bits=99"],
        ["compress", str(tiny_llama_dir), str(tmp_path / "z"), "--codec", "rtn:colour=blue"],
        ["compress", str(tmp_path), str(tmp_path / "w"), "--codec", "rtn"],
        ["inspect", str(tmp_path / "missing")],
        ["generate", str(tiny_llama_dir), "hi", "--cache-budget", "lots"],
    ]
    words = ["nosuch", "bits", "colour", "config.json", "missing", "cache-budget"]
    for argv, word in zip(cases, words):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and word in err, (argv, err)


def test_console_script_entry_point(ckpt):
    proc = subprocess.run([sys.executable, "-m", "thawed.runtime.cli", "inspect", str(ckpt), "--totals"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "whole file" in proc.stdout
