"""A short mixed load through a real ``thawed serve`` (benchmarks/load.py --mix on the tiny model):
streaming chat, completions, TGI streams and clients that disconnect mid-stream, with /health
polled throughout: no 5xx, nothing malformed, /health always 200, RSS bounded. The 32-client,
60 s run on SmolLM2 is the benchmark (docs/SERVING.md); this is its 8 s check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from server_fixtures import tiny_chat_ckpt  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def test_mixed_load_has_no_5xx_and_health_answers(tiny_chat_ckpt):  # noqa: F811
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load.py"), str(tiny_chat_ckpt), "--mix",
                          "--clients", "12", "--seconds", "8", "--max-tokens", "8", "--max-running", "4",
                          "--max-queue", "4", "--max-rss-mib", "2048", "--server-arg=--device=cpu"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    report = json.loads(out.stdout[out.stdout.index("{"):])
    assert report["5xx"] == 0 and report["malformed"] == 0 and report["transport_errors"] == 0
    assert set(report["kinds"]) == {"chat_stream", "completion", "tgi_stream", "disconnect"}, report["kinds"]
    assert report["disconnects"] > 0 and report["completed_streams"] > 10
    assert report["health"]["failures"] == 0 and report["health"]["polls"] > 10
    assert 0 < report["rss_mib"]["ready"] <= report["rss_mib"]["peak"] < 2048
