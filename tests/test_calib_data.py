"""Calibration data (runtime/compress/calib_data.py): self-generated text is deterministic for a seed and
cached per model; ``--calib-text FILE`` is what the calibrated stages see when given; bad
choices fail with errors that name the option."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from models_fixtures import tiny_llama_dir  # noqa: F401

from thawed.codecs.errors import ThawedError
from thawed.runtime.cli import main
from thawed.runtime.compress.calib_data import CalibSpec, calibration_data, self_generate


def test_self_generated_is_deterministic_for_a_seed(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    a = self_generate(model, tok, 3, 40, seed=7)
    b = self_generate(model, tok, 3, 40, seed=7)
    c = self_generate(model, tok, 3, 40, seed=8)
    assert a == b and a != c
    assert all(len(s) == 40 and s[0] == tok.bos_token_id for s in a)
    assert len({tuple(s[1:]) for s in a}) == 3  # varied starts and samples: no two sequences alike


def test_self_generated_is_cached_per_model(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = CalibSpec(seed=3, cache_dir=tmp_path / "calib")
    first = calibration_data(tiny_llama_dir, 300, spec, seq_len=128)
    assert not first.record["cached"] and first.record["source"] == "self"
    assert first.tokens == 300 and max(len(w) for w in first.windows) <= 128
    assert first.record["generation_seconds"] > 0
    files = list((tmp_path / "calib").glob("self-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["settings"]["seed"] == 3
    again = calibration_data(tiny_llama_dir, 300, spec, seq_len=128)
    assert again.record["cached"] and again.windows == first.windows
    other = calibration_data(tiny_llama_dir, 300, CalibSpec(seed=4, cache_dir=tmp_path / "calib"), seq_len=128)
    assert other.windows != first.windows


def test_calib_text_file_is_used(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    text = tmp_path / "mine.txt"
    text.write_text("the queen of england is in london and the king is in paris " * 20)
    data = calibration_data(tiny_llama_dir, 50, CalibSpec.from_args(None, text), seq_len=16)
    ids = AutoTokenizer.from_pretrained(str(tiny_llama_dir))(text.read_text(), add_special_tokens=False)["input_ids"]
    assert data.flat() == ids[:50] and data.record["source"] == "file" and data.record["path"] == str(text)
    assert data.record["sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()  # which text, not just where
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 cr\u00e8me ".encode("latin-1") * 10)
    with pytest.raises(ThawedError, match="not UTF-8.*convert"):
        calibration_data(tiny_llama_dir, 50, CalibSpec.from_args(None, latin), seq_len=16)


def test_compress_records_the_calibration_it_used(tiny_llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from thawed.runtime.checkpoint import Checkpoint

    monkeypatch.setenv("THAWED_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "mine.txt"
    text.write_text("paris is the capital of france and london is the capital of england " * 30)
    out = tmp_path / "ck"
    assert main(["compress", str(tiny_llama_dir), str(out), "--codec", "rtn:bits=4,group_size=32,gptq=true",
                 "--calib-text", str(text), "--calib-tokens", "200", "--no-progress"]) == 0
    with Checkpoint.open(out) as ck:
        settings = ck.metadata["settings"]
    assert settings["calibration"]["source"] == "file" and settings["calibration"]["path"] == str(text)
    assert settings["calibration"]["tokens"] == 200 and settings["input_stats"]["tokens"] == 200
    out2 = tmp_path / "ck2"  # default: self-generated, cached under $THAWED_CACHE/calib
    assert main(["compress", str(tiny_llama_dir), str(out2), "--codec", "rtn:bits=4,group_size=32,gptq=true",
                 "--calib-tokens", "300", "--no-progress"]) == 0
    with Checkpoint.open(out2) as ck:
        cal = ck.metadata["settings"]["calibration"]
    assert cal["source"] == "self" and cal["tokens"] == 300 and cal["cache"].startswith(str(tmp_path / "cache"))


def test_bad_calibration_choices_fail_clearly(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["compress", str(tiny_llama_dir), str(tmp_path / "x"), "--codec", "rtn:gptq=true",
                 "--calib-text", str(tmp_path / "missing.txt")]) == 2
    assert "--calib-text" in capsys.readouterr().err
    with pytest.raises(ThawedError, match="drop --calib"):
        CalibSpec.from_args("ptb-train", tmp_path / "x.txt")
    with pytest.raises(ThawedError, match="unknown"):
        CalibSpec("wiki")


def test_cli_help_states_the_pipeline_default_calibration_tokens_for_compress_and_heal():
    """The CLI may not import the compressor (tests/test_layout.py), so its help states the default
    as text: it must be the pipeline's constant."""
    from thawed.runtime.cli import build_parser
    from thawed.runtime.compress.calib_data import DEFAULT_CALIB_TOKENS

    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "compress" in a.choices)
    for command in ("compress", "heal"):
        opt = next(a for a in sub.choices[command]._actions if "--calib-tokens" in a.option_strings)
        assert opt.default is None and f"default {DEFAULT_CALIB_TOKENS}" in opt.help, command
    from thawed.runtime.compress.heal import HealConfig

    assert HealConfig().calib_tokens == DEFAULT_CALIB_TOKENS
