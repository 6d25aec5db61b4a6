"""``thawed report``: the figures (bits per tensor, bytes by codec and role, SQNR against the source)
and the self-contained HTML page, on the tiny Llama; bad input gives one clear line."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from models_fixtures import make_tiny_llama, real_model_dir, tiny_llama_dir  # noqa: F401
from server_fixtures import real_ckpt_dir  # noqa: F401

from thawed.codecs.errors import ThawedError
from thawed.runtime.checkpoint import Checkpoint
from thawed.runtime.cli import main
from thawed.runtime.compress.source import SourceModel
from thawed.runtime.report import collect_report, split_layer, sqnr_db, write_report
from thawed.runtime.report.svg import colour, heatmap


@pytest.fixture(scope="module")
def mixed_ckpt(tiny_llama_dir, tmp_path_factory):
    """rtn 4-bit everywhere, 8-bit v_proj, lossless down_proj of layer 1: three codecs, several rates."""
    out = tmp_path_factory.mktemp("report") / "ckpt"
    assert main(["compress", str(tiny_llama_dir), str(out), "--codec", "rtn:bits=4,group_size=32",
                 "--codec-for", "*.v_proj.weight=rtn:bits=8,group_size=32",
                 "--codec-for", "model.layers.1.mlp.down_proj.weight=lossless", "--no-progress"]) == 0
    return out


def test_sqnr_db_values():
    w = torch.randn(1000, dtype=torch.float64)
    assert sqnr_db(w, w) == math.inf
    assert sqnr_db(w, w * 1.1) == pytest.approx(20.0, abs=1e-9)   # noise = 0.1 w: 10 log10(1 / 0.01)
    assert sqnr_db(w, torch.zeros_like(w)) == pytest.approx(0.0, abs=1e-9)
    assert sqnr_db(torch.zeros(4), torch.ones(4)) == -math.inf
    noisy = w + 0.05 * torch.randn(1000, dtype=torch.float64)
    assert sqnr_db(w, noisy, chunk=7) == pytest.approx(sqnr_db(w, noisy), rel=1e-12)  # chunked sums agree
    with pytest.raises(ValueError, match="shapes differ"):
        sqnr_db(w, w[:10])


def test_split_layer():
    assert split_layer("model.layers.3.self_attn.q_proj.weight") == (3, "self_attn.q_proj")
    assert split_layer("model.layers.12.input_layernorm.weight") == (12, "input_layernorm")
    assert split_layer("transformer.h.0.attn.c_attn.weight") == (None, "transformer.h.0.attn.c_attn.weight")
    assert split_layer("model.embed_tokens.weight") == (None, "model.embed_tokens.weight")


def test_figures_match_the_file(mixed_ckpt, tiny_llama_dir):
    with Checkpoint.open(mixed_ckpt) as ckpt:
        data = collect_report(ckpt, against=tiny_llama_dir)
        index = dict(ckpt.index)
        total = ckpt.file_nbytes
    assert data.layers == [0, 1]
    assert data.kinds == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # a block's order; raw norms left out
    grid = data.grid(lambda t: t.bpw)
    v = data.kinds.index("self_attn.v_proj")
    q = data.kinds.index("self_attn.q_proj")
    assert grid[0][v] > grid[0][q] + 3  # 8-bit v_proj beside 4-bit q_proj
    for row in data.tensors:
        e = index[row.name]
        assert row.bytes == e.nbytes and row.bpw == pytest.approx(e.nbytes * 8 / e.numel, abs=1e-3)
    # every byte of the file is in exactly one bar: tensors by codec and role, shared state, header
    bars = sum(sum(r.values()) for r in data.bytes_by_codec_role.values())
    assert bars + sum(data.shared_bytes.values()) + data.header_bytes == total
    assert set(data.bytes_by_codec_role) == {"rtn", "lossless", "raw"}
    assert data.bytes_by_codec_role["raw"].keys() == {"norm/bias"}
    # SQNR recomputed here, independently: decode + source tensor
    by_name = {t.name: t for t in data.tensors}
    with Checkpoint.open(mixed_ckpt) as ckpt, SourceModel(tiny_llama_dir) as src:
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"):
            ref = src.get(name).double()
            err = ckpt.decode(name, "cpu", torch.float64) - ref
            want = 10 * math.log10(float(ref.square().sum()) / float(err.square().sum()))
            assert by_name[name].sqnr_db == pytest.approx(want, abs=1e-6)
    assert by_name["model.layers.1.mlp.down_proj.weight"].sqnr_db == math.inf  # lossless is exact
    q4 = by_name["model.layers.0.self_attn.q_proj.weight"].sqnr_db
    v8 = by_name["model.layers.0.self_attn.v_proj.weight"].sqnr_db
    assert 14 < q4 < 30 and v8 > q4 + 15  # 4 bits ~ 20 dB, each extra bit ~ 6 dB
    assert all(t.sqnr_db is None for t in data.tensors if t.codec == "raw")


def test_html_is_self_contained_and_draws_every_cell(mixed_ckpt, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "report.html"
    js = tmp_path / "report.json"
    assert main(["report", str(mixed_ckpt), "--against", str(tiny_llama_dir), "--out", str(out),
                 "--json", str(js)]) == 0
    assert "wrote" in capsys.readouterr().out
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    # no network at view time: nothing to fetch, and a CSP that forbids it anyway
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)
    assert "<script" not in html and "default-src 'none'" in html
    charts = {name: int(n) for n, name in re.findall(r'class="chart" data-marks="(\d+)" data-chart="([^"]+)"', html)}
    assert charts == {"bpw-heatmap": 14, "bytes-by-codec": 5, "sqnr-heatmap": 14}, charts
    assert html.count('<rect class="cell"') == 28
    assert "model.layers.1.mlp.down_proj.weight [lossless" in html  # tooltips name the tensor
    assert "∞" in html                                              # the lossless cell
    assert str(tiny_llama_dir) in html and "rtn" in html and "group_size" in html  # source and settings
    data = json.loads(js.read_text())
    assert data["against"] == str(tiny_llama_dir) and len(data["tensors"]) == 2 * 9 + 2
    assert {t["sqnr_db"] for t in data["tensors"] if t["codec"] == "lossless"} == {"inf"}


def test_without_against_there_is_no_sqnr(mixed_ckpt, tmp_path):
    data = write_report(mixed_ckpt, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert data.against is None and 'data-chart="sqnr-heatmap"' not in html
    assert "thawed report CKPT --against SRC" in html


def test_bad_input_is_one_clear_line(mixed_ckpt, tiny_llama_dir, tmp_path, capsys):
    cases = [
        (["report", str(mixed_ckpt), "--out", str(tmp_path)], "is a directory"),
        (["report", str(mixed_ckpt), "--out", str(tmp_path / "no" / "r.html")], "does not exist"),
        (["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r.html")], "does not exist"),
        (["report", str(mixed_ckpt), "--against", str(tmp_path), "--out", str(tmp_path / "r.html")],
         "not a Hugging Face model directory"),
        (["report", str(mixed_ckpt), "--against", str(mixed_ckpt), "--out", str(tmp_path / "r.html")],
         "is a thawed checkpoint; give the dense Hugging Face directory"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err, err


def test_against_a_different_model_is_refused(mixed_ckpt, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    make_tiny_llama(other)
    cfg = LlamaConfig.from_pretrained(other)
    cfg.intermediate_size = 96  # mlp shapes differ
    LlamaForCausalLM(cfg).save_pretrained(other)
    with Checkpoint.open(mixed_ckpt) as ckpt, pytest.raises(ThawedError, match="has shape .* compressed from"):
        collect_report(ckpt, against=other)


def test_heatmap_scale_and_missing_cells():
    svg = heatmap([[1.0, None], [3.0, math.inf]], ["0", "1"], ["a", "b"], name="t", title="t", unit="u",
                  fmt=lambda v: f"{v:.1f}")
    assert 'data-marks="3"' in svg and svg.count('class="cell"') == 3
    assert f'fill="{colour(0.0)}"' in svg and f'fill="{colour(1.0)}"' in svg
    # near-equal values are not stretched to the ends of the scale
    svg = heatmap([[4.25, 4.28]], ["0"], ["a", "b"], name="t", title="t", unit="u", fmt=str, min_span=1.0)
    fills = re.findall(r'class="cell"[^>]*fill="(#[0-9a-f]{6})"', svg)
    assert len(fills) == 2 and colour(0.0) not in fills and colour(1.0) not in fills
    assert fills == [colour(0.5 - 0.015), colour(0.5 + 0.015)]


@pytest.mark.real
def test_real_smollm2_report(real_ckpt_dir, real_model_dir, tmp_path):  # noqa: F811
    """The cached SmolLM2 rtn 8-bit g64 checkpoint against its source: 30 blocks x 7 linears, every
    linear at 8.5 bits/weight, and 8-bit SQNR (~6 dB a bit: > 40 dB) on every coded tensor."""
    data = write_report(real_ckpt_dir, tmp_path / "r.html", against=real_model_dir)
    assert len(data.layers) == 30 and len(data.kinds) == 7
    assert all(v == pytest.approx(8.5, abs=0.01) for row in data.grid(lambda t: t.bpw) for v in row)
    coded = [t for t in data.tensors if t.codec != "raw"]
    assert len(coded) == 211 and all(40 < t.sqnr_db < 60 for t in coded), min(t.sqnr_db for t in coded)
    html = (tmp_path / "r.html").read_text()
    assert html.count('<rect class="cell"') == 2 * 30 * 7 and len(html) < 400_000
