"""Issue 14: a lying or damaged checkpoint is refused with a one-line typed error, never loaded wrong.

Each lie the issue found loading silently, and each traceback it found, has a test here; the
randomised families are in tests/test_fuzz_checkpoint.py.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from checkpoint_mutants import _edit
from models_fixtures import tiny_llama_dir  # noqa: F401

from thawed.codecs import EncodeContext, Encoded, TensorSpec, ThawedError, get_codec
from thawed.runtime.checkpoint import Checkpoint
from thawed.runtime.cli import main
from thawed.runtime.compress.pipeline import compress
from thawed.runtime.compress.plan import Plan, parse_codec_choice
from thawed.runtime.compress.writer import CheckpointWriter
from thawed.runtime.errors import (
    CheckpointNotFoundError,
    ChecksumError,
    ConfigError,
    FieldMismatchError,
    FormatError,
    HeaderError,
    IndexMismatchError,
    NonFiniteError,
)
from thawed.runtime.format import MARKER_FILE, PAYLOAD_FILE
from thawed.runtime.loading import load_for_inference
from thawed.runtime.model import RuntimeConfig

CPU = RuntimeConfig(device="cpu", prefetch_layers=0)
Q_PROJ = "model.layers.{}.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def rtn_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "rtn"
    compress(tiny_llama_dir, out, Plan(parse_codec_choice("rtn:bits=4,group_size=32"), ()), progress=False)
    return out


@pytest.fixture
def ckpt(rtn_dir, tmp_path) -> Path:
    """A fresh copy of the rtn checkpoint to damage."""
    return Path(shutil.copytree(rtn_dir, tmp_path / "c"))


def _load_forward(folder: Path) -> torch.Tensor:
    loaded = load_for_inference(folder, CPU)
    try:
        with torch.inference_mode():
            return loaded.model(input_ids=torch.tensor([[1, 5, 9, 3]])).logits
    finally:
        loaded.close()


def _one_line(exc: BaseException, *words: str) -> str:
    msg = str(exc)
    assert isinstance(exc, ThawedError), f"{type(exc).__name__}: {msg}"
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


# ---- the lies that loaded silently --------------------------------------------------------------


def test_rtn_group_size_32_to_33_is_refused(ckpt):
    def lie(h, i, m, d):
        i[Q_PROJ.format(0)]["params"]["group_size"] = 33  # 64 columns: still 2 groups, same shapes

    payload = ckpt / PAYLOAD_FILE
    _edit(payload, lie, reseal=False)  # a plain edit: the header checksum catches it on open
    with pytest.raises(ChecksumError) as info:
        Checkpoint.open(ckpt)
    _one_line(info.value, PAYLOAD_FILE, "header_checksum", "edited")
    _edit(payload, lambda *a: None, reseal=True)  # header checksum recomputed: the tensor's digest binds its params
    with Checkpoint.open(ckpt) as c:
        assert c.index[Q_PROJ.format(0)].params["group_size"] == 33
        with pytest.raises(ChecksumError) as info:
            c.decode(Q_PROJ.format(0))
    _one_line(info.value, repr(Q_PROJ.format(0)), "params")
    with pytest.raises(ChecksumError):
        _load_forward(ckpt)


def test_swapped_layers_with_their_checksums_are_refused(ckpt):
    a, b = Q_PROJ.format(0), Q_PROJ.format(1)

    def swap(h, i, m, d):
        for f in i[a]["fields"]:
            h[f"{a}::{f}"]["data_offsets"], h[f"{b}::{f}"]["data_offsets"] = \
                h[f"{b}::{f}"]["data_offsets"], h[f"{a}::{f}"]["data_offsets"]
        i[a]["checksum"], i[b]["checksum"] = i[b]["checksum"], i[a]["checksum"]

    _edit(ckpt / PAYLOAD_FILE, swap, reseal=True)
    with pytest.raises(ChecksumError) as info:
        _load_forward(ckpt)
    _one_line(info.value, "model.layers.", "q_proj.weight", "checksum")


def test_nan_in_a_payload_with_recomputed_checksums_names_the_tensor(ckpt):
    name = "model.layers.1.mlp.down_proj.weight"

    def nan(h, i, m, d):
        b, _ = h[f"{name}::scale"]["data_offsets"]
        d[b:b + 2] = b"\x00\x7e"  # F16 NaN

    _edit(ckpt / PAYLOAD_FILE, nan, reseal=True, recompute=True)
    with Checkpoint.open(ckpt) as c:
        c.encoded(name)  # every checksum matches: only the decoded values tell
    with pytest.raises(NonFiniteError) as info:
        _load_forward(ckpt)
    _one_line(info.value, repr(name), "NaN or Inf")


def test_lossless_source_nan_is_kept_and_recorded(tmp_path):
    lossless = get_codec("lossless")()
    t = torch.tensor([[1.0, float("nan")], [float("inf"), -2.0]])
    spec = TensorSpec("w", tuple(t.shape), t.dtype, "linear")
    from thawed.runtime.validate import mark_nonfinite

    with CheckpointWriter(tmp_path / "ok", source="s", settings={}) as w:
        w.add(spec, "lossless", 1, mark_nonfinite("lossless", t, lossless.encode(t, spec, EncodeContext("w"))))
        w.add(TensorSpec("x", (2,), torch.float32), "raw", 1, Encoded({"data": torch.tensor([1.0, float("inf")])}, {}))
    with Checkpoint.open(tmp_path / "ok") as c:
        assert c.index["w"].params["nonfinite"] is True
        got = c.decode("w")
        assert torch.equal(got.view(torch.int32), t.view(torch.int32))  # bit for bit, NaN included
        with pytest.raises(NonFiniteError, match="'x'"):  # raw without the record: refused
            c.decode("x")


def test_lowering_num_hidden_layers_is_refused(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as info:
        _load_forward(ckpt)
    _one_line(info.value, "config.json", "num_hidden_layers=1", "2 blocks under 'model.layers'")


def test_every_index_entry_must_be_used(ckpt):
    def extra(h, i, m, d):
        d.extend(torch.ones(4).numpy().tobytes())
        end = len(d)
        h["model.extra.weight::data"] = {"dtype": "F32", "shape": [4], "data_offsets": [end - 16, end]}
        i["model.extra.weight"] = {"codec": "raw", "codec_version": 1, "shape": [4], "dtype": "float32",
                                   "role": "other", "fields": ["data"], "params": {}, "checksum": ""}

    _edit(ckpt / PAYLOAD_FILE, extra, reseal=True, recompute=True)
    with pytest.raises(IndexMismatchError) as info:
        _load_forward(ckpt)
    _one_line(info.value, PAYLOAD_FILE, "'model.extra.weight'", "not used")


# ---- params bound in every codec ------------------------------------------------------------------

CODECS = ["raw", "rtn", "lossless", "cvxq", "hyperc", "nwc", "see"]


def _one_tensor(tmp_path: Path, codec: str) -> tuple[Path, str]:
    torch.manual_seed(0)
    w = torch.randn(64, 96) * 0.05
    spec = TensorSpec("model.w", (64, 96), torch.float32, "linear")
    c = get_codec(codec)()
    enc = c.encode(w, spec, EncodeContext("model.w", role="linear"))
    with CheckpointWriter(tmp_path / codec, source="s", settings={}) as wr:
        wr.add(spec, c.name, c.version, enc)
        if c.shared_tensors():
            wr.add_shared(c.name, c.shared_tensors())
    return tmp_path / codec, "model.w"


def _variants(v):
    if isinstance(v, bool):
        return [not v]
    if isinstance(v, int):
        return [v + 1, v - 1, v * 2]
    if isinstance(v, float):
        return [v + 0.5]
    if isinstance(v, list):
        return [v[::-1], v + v[:1]]
    return ["rows" if v != "rows" else "matrix"]


@pytest.mark.parametrize("codec", CODECS)
def test_every_param_of_every_codec_is_bound(tmp_path, codec):
    """Each param edited (header checksum recomputed, the tensor's checksum not) is refused on open
    (shapes) or on first read (the v2 digest covers params): never decoded."""
    folder, name = _one_tensor(tmp_path, codec)
    with Checkpoint.open(folder) as c:
        params = dict(c.index[name].params)
        want = c.decode(name)
    cases = [(k, v2) for k, v in params.items() for v2 in _variants(v) if v2 != v] + [("surprise", 1)]
    assert cases
    for key, value in cases:
        work = Path(shutil.copytree(folder, tmp_path / "w", dirs_exist_ok=True))

        def lie(h, i, m, d, key=key, value=value):
            i[name]["params"][key] = value

        _edit(work / PAYLOAD_FILE, lie, reseal=True)
        try:
            with Checkpoint.open(work) as c:
                c.decode(name)
        except (FieldMismatchError, ChecksumError, HeaderError) as exc:
            _one_line(exc, PAYLOAD_FILE, repr(name) if not isinstance(exc, HeaderError) else "")
        else:
            pytest.fail(f"codec {codec!r}: param {key}={value!r} was accepted (decoded {want.shape})")
        shutil.rmtree(work)


# ---- tracebacks that became one-line errors ----------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "dangling", "fifo", "folder", "dev_zero", "proc_mem"])
def test_payload_special_files_never_reach_the_dense_loader(ckpt, kind, monkeypatch):
    payload = ckpt / PAYLOAD_FILE
    payload.unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (ckpt / "model.safetensors").write_bytes(b"")
    {"missing": lambda: None, "dangling": lambda: os.symlink("/nonexistent/x", payload),
     "fifo": lambda: os.mkfifo(payload), "folder": lambda: payload.mkdir(),
     "dev_zero": lambda: os.symlink("/dev/zero", payload),
     "proc_mem": lambda: os.symlink("/proc/self/mem", payload)}[kind]()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointNotFoundError) as info:
        load_for_inference(ckpt, CPU)
    assert time.perf_counter() - t0 < 10
    _one_line(info.value, PAYLOAD_FILE if kind != "missing" else MARKER_FILE)


def test_dense_path_loads_safetensors_only(tiny_llama_dir, tmp_path, monkeypatch):
    dense = Path(shutil.copytree(tiny_llama_dir, tmp_path / "d"))
    for p in dense.glob("*.safetensors"):
        p.unlink()
    (dense / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    with pytest.raises(ThawedError) as info:
        load_for_inference(dense, CPU)
    _one_line(info.value, "never loaded")


@pytest.mark.parametrize("key,value,words", [
    ("num_attention_heads", 0, ["num_attention_heads=0"]),
    ("num_hidden_layers", -1, ["num_hidden_layers=-1"]),
    ("hidden_act", "nope", ["hidden_act='nope'"]),
    ("hidden_size", 2**40, ["hidden_size=1099511627776"]),
    ("num_hidden_layers", 10**7, ["num_hidden_layers=10000000"]),
    ("model_type", "nope", ["config.json", "nope"]),
])
def test_bad_config_values_give_one_line(ckpt, key, value, words):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[key] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    with pytest.raises(ThawedError) as info:
        _load_forward(ckpt)
    assert time.perf_counter() - t0 < 20
    _one_line(info.value, "config.json", *words)


def test_json_nested_700_deep_and_lone_surrogates(ckpt, capsys):
    _edit(ckpt / PAYLOAD_FILE, lambda h, i, m, d: m.update(settings="[" * 700 + "]" * 700), reseal=True)
    with pytest.raises(HeaderError) as info:
        Checkpoint.open(ckpt)
    _one_line(info.value, "settings", "deeper than 32")

    def surrogate(h, i, m, d):
        m["settings"] = "{}"
        name = "model.norm.weight"
        i["\ud800bad"] = i.pop(name)
        h["\ud800bad::data"] = h.pop(f"{name}::data")

    _edit(ckpt / PAYLOAD_FILE, surrogate, reseal=True)
    assert main(["inspect", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "UTF-8" in err, err


def test_cli_errors_are_one_line(ckpt, rtn_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    tok = Path(shutil.copytree(rtn_dir, tmp_path / "tok"))
    (tok / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": 7}}')
    mt = Path(shutil.copytree(rtn_dir, tmp_path / "mt"))
    cfg = json.loads((mt / "config.json").read_text())
    (mt / "config.json").write_text(json.dumps(cfg | {"model_type": "nope"}))
    cases = [
        (["compress", str(rtn_dir), str(tmp_path / "file"), "--codec", "rtn"], "not a folder"),
        (["generate", str(tok), "the", "--max-new-tokens", "1", "--device", "cpu"], "tokenizer"),
        (["generate", str(mt), "the", "--max-new-tokens", "1", "--device", "cpu"], "nope"),
        (["inspect", str(tmp_path / "file")], "neither a folder"),
    ]
    for argv, word in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and word in err, (argv, err)


def test_every_error_is_a_format_or_thawed_error():
    assert issubclass(NonFiniteError, FormatError) and issubclass(ConfigError, FormatError)
