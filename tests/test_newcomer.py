"""What a newcomer meets first: --help names every codec, inspect lists layers in natural order,
compress logs progress when stderr is not a terminal, the demo and the README share one
checkpoint name, and the README states set-up time and disk use and gives max_tokens."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from models_fixtures import make_tiny_llama, tiny_llama_dir  # noqa: F401

from thawed.runtime.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def test_compress_help_lists_every_codec(capsys):
    from thawed.codecs.base import registered_codecs

    try:
        build_parser().parse_args(["compress", "--help"])
    except SystemExit:
        pass
    text = " ".join(capsys.readouterr().out.split())
    shipped = [n for n, cls in registered_codecs().items() if cls.__module__.startswith("thawed.codecs.")]
    assert len(shipped) >= 7, shipped
    for name in shipped:
        assert re.search(rf"\b{name}\b", text), name


def test_inspect_orders_layers_naturally(tmp_path, capsys):
    src = make_tiny_llama(tmp_path / "src", layers=12)
    out = tmp_path / "ck"
    assert main(["compress", str(src), str(out), "--codec", "rtn:bits=8,group_size=32", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    layers = [int(m) for m in re.findall(r"model\.layers\.(\d+)\.", capsys.readouterr().out)]
    assert len(set(layers)) == 12
    firsts = list(dict.fromkeys(layers))
    assert firsts == sorted(firsts) == list(range(12))


def test_compress_logs_progress_without_a_terminal(tiny_llama_dir, tmp_path, caplog, monkeypatch):  # noqa: F811
    from thawed.runtime.compress import pipeline as mod
    from thawed.runtime.compress.plan import Plan, parse_codec_choice

    monkeypatch.setattr(mod, "PROGRESS_EVERY", 0.001)
    slow = mod.SourceModel.get

    def get(self, name):  # a slow source: the heartbeat must speak during one tensor
        import time

        time.sleep(0.01)
        return slow(self, name)

    monkeypatch.setattr(mod.SourceModel, "get", get)
    with caplog.at_level(logging.INFO, logger="thawed.runtime.compress.pipeline"):
        mod.compress(tiny_llama_dir, tmp_path / "ck", Plan(parse_codec_choice("rtn:bits=4,group_size=32")),
                     progress=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compress: ")]
    assert lines and re.match(r"compress: \d+/\d+ tensors done, \d+ s so far; encoding ", lines[0]), lines[:3]


def test_demo_and_readme_share_the_checkpoint_name():
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    readme = (ROOT / "README.md").read_text()
    name = re.search(r"THAWED_DEMO_CKPT:-([^}]+)\}", demo).group(1)
    assert f"thawed compress $SRC {name} --codec rtn:bits=4,group_size=128" in readme
    assert f"thawed serve {name}" in readme


def test_readme_states_setup_time_and_disk_and_gives_max_tokens():
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"set-up takes about \d+", readme, re.I) and re.search(r"\d+(\.\d+)? ?GB of disk", readme)
    for block in re.findall(r"```python\n(.*?)```", readme, re.S):
        for call in re.findall(r"\.create\((.*?)\)\n", block, re.S):
            assert "max_tokens" in call, call


def test_generate_prints_no_transformers_warning_into_the_text(tiny_llama_dir, tmp_path):  # noqa: F811
    """transformers' past_key_values deprecation used to print in the middle of the generated text."""
    import subprocess
    import sys

    ck = tmp_path / "ck"
    assert main(["compress", str(tiny_llama_dir), str(ck), "--codec", "rtn:bits=8,group_size=32", "--no-progress"]) == 0
    out = subprocess.run([sys.executable, "-W", "default", "-m", "thawed.server.cli", "generate", str(ck), "the",
                          "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for stream in (out.stdout, out.stderr):
        assert "deprecated" not in stream.lower() and "FutureWarning" not in stream, stream[-2000:]
