"""Checkpoint format v2: golden bytes (and the v1 golden file still loading), round trip, safetensors compatibility, lazy open, writer
atomicity and streaming, config-file copying. Malformed files: tests/test_format_malformed.py."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from thawed.codecs import EncodeContext, Encoded, TensorSpec, ThawedError, get_codec
from thawed.runtime.checkpoint import Checkpoint
from thawed.runtime.compress.writer import CheckpointWriter, is_weight_file, partial_folders
from thawed.runtime.errors import ChecksumError, FormatError, TensorNotFoundError, WriterError
from thawed.runtime.format import MARKER_FILE, PAYLOAD_FILE, IndexEntry, bits_per_weight, read_header

from conftest import build_tiny_checkpoint

GOLDEN_SHA256 = "6277e8b85bbe1b985b70e4eff7deb392c3c651153097b3664b20deb53dd3e851"
GOLDEN_SIZE = 1427
# The first bytes: u64 header length 1312 (0x520), then the JSON header with its v2 header checksum.
GOLDEN_PREFIX = (
    b'\x20\x05\x00\x00\x00\x00\x00\x00{"__metadata__":{"format":"thawed","format_version":"2",'
    b'"header_checksum":"crc32:47ac85e3",'
    b'"index":"{\\"model.norm.weight\\":{\\"checksum\\":\\"crc32:efc3ec91\\",\\"codec\\":\\"raw\\",'
    b'\\"codec_version\\":1,\\"dtype\\":\\"float32\\",\\"fields\\":[\\"data\\'
)
# Format v1 (the same tensors, written by thawed before v2): kept byte for byte in tests/data.
GOLDEN_V1_SHA256 = "3917208a8fd452950bdcaa90c41d686bb55fbd4a47a0527be8a53f115952dcb7"
# The tensors part of the header: file order, largest element size first.
GOLDEN_TENSORS = (
    b'"model.norm.weight::data":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},'
    b'"__codec__.toy-format-test.0.table":{"dtype":"F32","shape":[16],"data_offsets":[16,80]},'
    b'"model.embed.weight::data":{"dtype":"BF16","shape":[3,2],"data_offsets":[80,92]},'
    b'"model.layer.weight::scale":{"dtype":"F16","shape":[3],"data_offsets":[92,98]},'
    b'"model.layer.weight::codes":{"dtype":"U8","shape":[3,3],"data_offsets":[98,107]}}      '
)


def _inputs() -> dict[str, torch.Tensor]:
    return {
        "model.norm.weight": torch.tensor([1.0, 0.5, -2.0, 3.0]),
        "model.embed.weight": (torch.arange(6, dtype=torch.float32) / 4).reshape(3, 2).bfloat16(),
        "model.layer.weight": ((torch.arange(15, dtype=torch.float32) - 7) / 7).reshape(3, 5),
    }


def test_golden_bytes(tmp_path, build_checkpoint):
    path = build_checkpoint(tmp_path / "a")
    blob = path.read_bytes()
    assert path.name == PAYLOAD_FILE
    assert blob[: len(GOLDEN_PREFIX)] == GOLDEN_PREFIX
    (n,) = struct.unpack("<Q", blob[:8])
    assert (8 + n) % 8 == 0
    assert blob[: 8 + n].endswith(GOLDEN_TENSORS)
    assert len(blob) == GOLDEN_SIZE
    assert hashlib.sha256(blob).hexdigest() == GOLDEN_SHA256


def test_same_inputs_same_bytes(tmp_path, tiny_source, build_checkpoint):
    a = build_checkpoint(tmp_path / "a", tiny_source).read_bytes()
    b = build_checkpoint(tmp_path / "b").read_bytes()
    assert a == b


def test_round_trip_fields_params_and_decode(tiny_ckpt, toy_codec):
    inputs = _inputs()
    raw, toy = get_codec("raw")(), toy_codec()
    with Checkpoint.open(tiny_ckpt) as ckpt:
        assert list(ckpt.index) == list(inputs)  # the writer's order
        for name, t in inputs.items():
            entry = ckpt.index[name]
            assert isinstance(entry, IndexEntry)
            assert entry.shape == tuple(t.shape) and entry.dtype == t.dtype
            codec = toy if entry.codec == toy.name else raw
            want = codec.encode(t, entry.spec, EncodeContext(name=name))
            got = ckpt.encoded(name)
            assert got.params == want.params
            assert set(got.fields) == set(want.fields) == set(entry.fields)
            for f, v in want.fields.items():
                assert got.fields[f].device.type == "cpu"
                assert got.fields[f].dtype == v.dtype and torch.equal(got.fields[f], v)
            assert entry.nbytes == want.nbytes == got.nbytes
            shared = ckpt.shared(entry.codec)
            assert torch.equal(ckpt.decode(name), codec.decode(want, entry.spec, shared, torch.device("cpu"), t.dtype))
            assert ckpt.decode(name).dtype == t.dtype
            assert ckpt.decode(name, dtype=torch.float64).dtype == torch.float64
        assert torch.equal(ckpt.decode("model.norm.weight"), inputs["model.norm.weight"])
        assert torch.equal(ckpt.decode("model.embed.weight"), inputs["model.embed.weight"])
        toy_w = ckpt.decode("model.layer.weight")
        assert (toy_w - inputs["model.layer.weight"]).abs().max() < 0.1
        assert ckpt.index["model.layer.weight"].codec_version == 2
        assert ckpt.index["model.layer.weight"].role == "linear"
        assert ckpt.index["model.layer.weight"].fields == ("scale", "codes")  # file order
        assert set(ckpt.shared(toy.name)) == {"0.table"}
        assert torch.equal(ckpt.shared(toy.name)["0.table"], toy_codec.TABLE)
        assert ckpt.shared("raw") == {}
        assert ckpt.metadata == {"format": "thawed", "format_version": 2, "source": "tests/tiny",
                                 "settings": {"plan": "toy", "seed": 0}}
        assert ckpt.path == tiny_ckpt and ckpt.config_dir == tiny_ckpt
        assert ckpt.payload_path == tiny_ckpt / PAYLOAD_FILE
        assert ckpt.file_nbytes == GOLDEN_SIZE
        assert ckpt.payload_nbytes == 16 + 64 + 12 + 6 + 9
        with pytest.raises(TensorNotFoundError, match="no tensor 'nope'"):
            ckpt.encoded("nope")


def test_open_payload_file_directly(tiny_ckpt):
    with Checkpoint.open(tiny_ckpt / PAYLOAD_FILE) as ckpt:
        assert ckpt.path == tiny_ckpt and len(ckpt.index) == 3


def test_bits_per_weight(tiny_ckpt):
    with Checkpoint.open(tiny_ckpt) as ckpt:
        e = ckpt.index["model.layer.weight"]
        assert e.nbytes == 3 * 2 + 3 * 3 and e.spec.numel == 15
        assert e.bpw == bits_per_weight(e.nbytes, 15) == 15 * 8 / 15
        assert ckpt.index["model.embed.weight"].bpw == 16.0
    assert bits_per_weight(10, 0) == 0.0


def test_safetensors_reads_it(tiny_ckpt, toy_codec):
    with Checkpoint.open(tiny_ckpt) as ckpt, safe_open(str(tiny_ckpt / PAYLOAD_FILE), framework="pt") as f:
        meta = f.metadata()
        assert meta["format"] == "thawed" and meta["format_version"] == "2"
        assert json.loads(meta["index"])["model.layer.weight"]["codec"] == "toy-format-test"
        assert set(f.keys()) == set(ckpt.tensors)
        for name, entry in ckpt.index.items():
            enc = ckpt.encoded(name)
            for fld in entry.fields:
                assert torch.equal(f.get_tensor(f"{name}::{fld}"), enc.fields[fld])
        assert torch.equal(f.get_tensor("__codec__.toy-format-test.0.table"), toy_codec.TABLE)


def test_fields_are_zero_copy_and_aligned(tiny_ckpt):
    with Checkpoint.open(tiny_ckpt) as ckpt:
        header = read_header(ckpt.payload_path)
        ptrs = set()
        for name in ckpt.index:
            for t in ckpt.encoded(name).fields.values():
                ptrs.add(t.untyped_storage().data_ptr())  # one mapping backs every field
                assert t.data_ptr() % t.element_size() == 0
        assert len(ptrs) == 1
        for info in header.tensors.values():
            assert (header.data_start + info.begin) % info.dtype.itemsize == 0


def test_open_reads_no_payload_bytes(tiny_ckpt):
    """Corrupt the whole data buffer: open and the index still work, reading a tensor fails."""
    path = tiny_ckpt / PAYLOAD_FILE
    blob = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    for i in range(8 + n, len(blob)):
        blob[i] ^= 0xA5
    path.write_bytes(bytes(blob))
    with Checkpoint.open(tiny_ckpt) as ckpt:
        assert len(ckpt.index) == 3 and ckpt.payload_nbytes == len(blob) - 8 - n
        with pytest.raises(ChecksumError, match="model.layer.weight"):
            ckpt.encoded("model.layer.weight")
        with pytest.raises(ChecksumError, match="shared state of codec 'toy-format-test'"):
            ckpt.shared("toy-format-test")


def test_checksum_verified_once_and_thread_safe(tiny_ckpt):
    with Checkpoint.open(tiny_ckpt) as ckpt:
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(20):
                    for name in ckpt.index:
                        ckpt.encoded(name)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert ckpt._verified == set(ckpt.index)


def test_closed_checkpoint_refuses_but_tensors_survive(tiny_ckpt):
    ckpt = Checkpoint.open(tiny_ckpt)
    field = ckpt.encoded("model.norm.weight").fields["data"]
    ckpt.close()
    assert ckpt.closed
    assert torch.equal(field, torch.tensor([1.0, 0.5, -2.0, 3.0]))
    with pytest.raises(FormatError, match="closed"):
        ckpt.encoded("model.norm.weight")


def test_unaligned_field_is_copied(tmp_path, payload_io):
    """A valid safetensors layout thawed's writer never produces: an F32 field at an odd offset."""
    raw = get_codec("raw")()
    with CheckpointWriter(tmp_path / "u", source="s", settings={}) as w:
        for name, t in (("b", torch.arange(3, dtype=torch.uint8)), ("f", torch.tensor([1.5, -2.0]))):
            spec = TensorSpec(name=name, shape=tuple(t.shape), dtype=t.dtype)
            w.add(spec, "raw", 1, raw.encode(t, spec, EncodeContext(name=name)))
    path = tmp_path / "u" / PAYLOAD_FILE
    header, data = payload_io.read(path)
    assert header["f::data"]["data_offsets"] == [0, 8] and header["b::data"]["data_offsets"] == [8, 11]
    header["b::data"]["data_offsets"], header["f::data"]["data_offsets"] = [0, 3], [3, 11]
    payload_io.write(path, header, data[8:11] + data[0:8])
    with Checkpoint.open(path) as ckpt:
        assert torch.equal(ckpt.decode("f"), torch.tensor([1.5, -2.0]))
        assert torch.equal(ckpt.decode("b"), torch.arange(3, dtype=torch.uint8))


def test_config_files_copied_weights_skipped(tiny_ckpt):
    names = sorted(p.name for p in tiny_ckpt.iterdir())
    assert names == ["config.json", PAYLOAD_FILE, MARKER_FILE, "tokenizer.json"]
    assert json.loads((tiny_ckpt / MARKER_FILE).read_text())["format"] == "thawed"
    assert (tiny_ckpt / "config.json").read_text() == '{"model_type": "toy"}'
    assert is_weight_file("model-00001-of-00002.safetensors") and is_weight_file("x.gguf")
    assert is_weight_file("pytorch_model.bin.index.json") and not is_weight_file("tokenizer_config.json")


def _spec(name: str, t: torch.Tensor) -> TensorSpec:
    return TensorSpec(name=name, shape=tuple(t.shape), dtype=t.dtype)


def test_writer_failure_leaves_nothing(tmp_path):
    out = tmp_path / "new"
    raw = get_codec("raw")()
    t = torch.ones(4)
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(out, source="s", settings={}) as w:
            w.add(_spec("a", t), "raw", 1, raw.encode(t, _spec("a", t), EncodeContext(name="a")))
            raise RuntimeError("boom")
    assert not out.exists() and partial_folders(out) == []  # nothing left, temporary folder included


def test_writer_refuses_a_folder_that_is_not_empty(tiny_ckpt):
    before = (tiny_ckpt / PAYLOAD_FILE).read_bytes()
    with pytest.raises(WriterError, match=r"is not empty \(it holds config.json, model.thawed.safetensors"):
        CheckpointWriter(tiny_ckpt, source="s", settings={})
    assert (tiny_ckpt / PAYLOAD_FILE).read_bytes() == before
    assert sorted(p.name for p in tiny_ckpt.iterdir()) == ["config.json", PAYLOAD_FILE, MARKER_FILE, "tokenizer.json"]
    assert partial_folders(tiny_ckpt) == []


def test_writer_names_hidden_leftovers_of_older_versions(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / ".model.thawed.safetensors.abc.4.part").write_bytes(b"x")  # what a killed v1 writer left
    with pytest.raises(WriterError, match=r"not empty \(it holds \.model\.thawed\.safetensors\.abc\.4\.part\)"):
        CheckpointWriter(out, source="s", settings={})


def test_writer_refuses_a_file_as_output(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(WriterError, match="exists and is not a folder"):
        CheckpointWriter(tmp_path / "f", source="s", settings={})


def test_writer_streams_to_disk(tmp_path):
    """Field bytes are on disk after ``add``, before ``finish``, in a hidden sibling folder; the
    checkpoint folder appears only at the end, whole (one rename)."""
    out = tmp_path / "s"
    raw = get_codec("raw")()
    t = torch.arange(1000, dtype=torch.float32)
    with CheckpointWriter(out, source="s", settings={}) as w:
        w.add(_spec("a", t), "raw", 1, raw.encode(t, _spec("a", t), EncodeContext(name="a")))
        for g in w._groups.values():
            g.file.flush()
        assert w.temp_dir.parent == tmp_path and w.temp_dir.name.startswith(".s.thawed-partial-")
        assert sum(p.stat().st_size for p in w.temp_dir.iterdir()) == 4000
        assert not out.exists()
        path = w.finish()
        assert w.finish() == path
    assert sorted(p.name for p in out.iterdir()) == [PAYLOAD_FILE, MARKER_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary left


def test_files_are_readable_by_others_and_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        build_tiny_checkpoint(tmp_path / "a")
        os.umask(0o027)
        build_tiny_checkpoint(tmp_path / "b")
    finally:
        os.umask(old)
    for folder, fmode, dmode in ((tmp_path / "a", 0o644, 0o755), (tmp_path / "b", 0o640, 0o750)):
        assert stat.S_IMODE(folder.stat().st_mode) == dmode
        for p in folder.iterdir():
            assert stat.S_IMODE(p.stat().st_mode) == fmode, p


def test_format_v1_still_loads_with_a_warning(tmp_path, caplog):
    v1 = Path(__file__).parent / "data" / "format_v1_tiny.safetensors"
    assert hashlib.sha256(v1.read_bytes()).hexdigest() == GOLDEN_V1_SHA256
    folder = tmp_path / "v1"
    folder.mkdir()
    shutil.copyfile(v1, folder / PAYLOAD_FILE)
    with caplog.at_level(logging.WARNING), Checkpoint.open(folder) as old, \
            Checkpoint.open(build_tiny_checkpoint(tmp_path / "v2")) as new:
        assert old.metadata["format_version"] == 1 and new.metadata["format_version"] == 2
        for name in new.index:
            assert torch.equal(old.decode(name), new.decode(name))
    assert "format version 1" in caplog.text and "params" in caplog.text and "not checked" in caplog.text


def test_writer_rejects_bad_input(tmp_path, toy_codec):
    raw, toy = get_codec("raw")(), toy_codec()
    t = torch.ones(2, 3)
    with CheckpointWriter(tmp_path / "w", source="s", settings={}) as w:
        w.add(_spec("a", t), "raw", 1, raw.encode(t, _spec("a", t), EncodeContext(name="a")))
        with pytest.raises(WriterError, match="'a' was already added"):
            w.add(_spec("a", t), "raw", 1, raw.encode(t, _spec("a", t), EncodeContext(name="a")))
        with pytest.raises(WriterError, match="may not contain '::'"):
            w.add(_spec("b::c", t), "raw", 1, Encoded({"data": t}, {}))
        with pytest.raises(WriterError, match="reserved"):
            w.add(_spec("__codec__.x", t), "raw", 1, Encoded({"data": t}, {}))
        with pytest.raises(WriterError, match="field 'data'.*expected_fields"):
            w.add(_spec("b", t), "raw", 1, Encoded({"data": torch.ones(3, 2)}, {}))
        with pytest.raises(WriterError, match="version 3 is newer"):
            w.add(_spec("b", t), "raw", 3, Encoded({"data": t}, {}))
        with pytest.raises(WriterError, match="unknown codec 'nope'"):
            w.add(_spec("b", t), "nope", 1, Encoded({"data": t}, {}))
        with pytest.raises(WriterError, match="rejects its own params"):
            w.add(_spec("b", t), toy.name, 2, Encoded(toy.encode(t, _spec("b", t), EncodeContext("b")).fields, {"bits": 3}))
        with pytest.raises(WriterError, match="not JSON"):
            w.add(_spec("b", t), "raw", 1, Encoded({"data": t}, {"x": float("nan")}))
        w.add_shared(toy.name, toy.shared_tensors())
        with pytest.raises(WriterError, match="already added"):
            w.add_shared(toy.name, toy.shared_tensors())
        with pytest.raises(WriterError, match="<id>.<param>"):
            w.add_shared("other", {"table": torch.ones(2)})
    with Checkpoint.open(tmp_path / "w") as ckpt:  # the rejected calls left no trace
        assert list(ckpt.index) == ["a"]
    with pytest.raises(WriterError, match="finished"):
        w.add(_spec("z", t), "raw", 1, Encoded({"data": t}, {}))
    assert issubclass(WriterError, ThawedError)


def test_more_dtypes_round_trip(tmp_path):
    raw = get_codec("raw")()
    values = {
        "f64": torch.tensor([1.0, -2.5], dtype=torch.float64), "f16": torch.tensor([0.5], dtype=torch.float16),
        "i64": torch.tensor([-(2**40)]), "i32": torch.tensor([7], dtype=torch.int32),
        "i16": torch.tensor([-3], dtype=torch.int16), "i8": torch.tensor([-4], dtype=torch.int8),
        "b": torch.tensor([True, False]), "scalar": torch.tensor(3.0), "empty": torch.zeros(0, 4),
    }
    with CheckpointWriter(tmp_path / "d", source="s", settings={}) as w:
        for name, t in values.items():
            w.add(_spec(name, t), "raw", 1, raw.encode(t, _spec(name, t), EncodeContext(name=name)))
    with Checkpoint.open(tmp_path / "d") as ckpt, safe_open(str(ckpt.payload_path), "pt") as f:
        for name, t in values.items():
            assert ckpt.decode(name).dtype == t.dtype and torch.equal(ckpt.decode(name), t)
            assert torch.equal(f.get_tensor(f"{name}::data"), t)


def test_empty_checkpoint(tmp_path):
    with CheckpointWriter(tmp_path / "e", source="s", settings={}) as w:
        path = w.finish()
    with Checkpoint.open(path) as ckpt, safe_open(str(path), "pt") as f:
        assert ckpt.index == {} and ckpt.payload_nbytes == 0 and list(f.keys()) == []
