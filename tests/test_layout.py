"""The serving path never imports the offline side: ``thawed.runtime.compress`` (the compression
pipeline, planning, calibration, the writer) stays out of ``sys.modules`` when the loader, the model,
generation, the server app or the CLI are imported, and when a checkpoint is loaded and generates.
Each check runs in a fresh interpreter, since this test session imports the compressor itself."""

from __future__ import annotations

import subprocess
import sys

import pytest
from models_fixtures import tiny_llama_dir  # noqa: F401

OFFLINE = "thawed.runtime.compress"

ONLINE = ["thawed.runtime.loading", "thawed.runtime.model", "thawed.runtime.checkpoint", "thawed.runtime.generate",
          "thawed.runtime.stepper", "thawed.runtime.cli", "thawed.server.app", "thawed.server.engine",
          "thawed.server.openai_routes", "thawed.server.tgi_routes", "thawed.server.cli"]


def _offline_modules_after(code: str) -> list[str]:
    probe = code + ("\nimport sys\n"
                    f"print(' '.join(m for m in sys.modules if m == {OFFLINE!r} or m.startswith({OFFLINE + '.'!r})))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


@pytest.mark.parametrize("module", ONLINE)
def test_importing_the_serving_path_leaves_the_compressor_out(module):
    assert _offline_modules_after(f"import {module}") == []


def test_the_compressor_package_imports_nothing_itself():
    assert _offline_modules_after(f"import {OFFLINE}") == [OFFLINE]


def test_loading_and_generating_leave_the_compressor_out(tiny_llama_dir, tmp_path):  # noqa: F811
    from thawed.runtime.compress.pipeline import compress
    from thawed.runtime.compress.plan import Plan, parse_codec_choice

    ckpt = tmp_path / "ck"
    compress(tiny_llama_dir, ckpt, Plan(parse_codec_choice("rtn:bits=4,group_size=32")), progress=False)
    code = (f"from thawed.runtime.generate import SamplingParams, generate_tokens\n"
            f"from thawed.runtime.loading import load_for_inference\n"
            f"loaded = load_for_inference({str(ckpt)!r})\n"
            f"ids = loaded.tokenizer('hello').input_ids\n"
            f"assert len(list(generate_tokens(loaded.model, ids, SamplingParams(max_new_tokens=2)))) == 2\n")
    assert _offline_modules_after(code) == []
