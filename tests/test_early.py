"""The early decoder (runtime/early.py): decoding that starts as soon as the checkpoint is open gives
the same model as decoding on demand; a failed early job surfaces as the runtime's own error; a
budget or CUDA turns it off; closing while jobs are queued neither hangs nor leaks results."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from models_fixtures import tiny_llama_dir  # noqa: F401

from thawed.runtime.errors import ChecksumError
from thawed.runtime.checkpoint import Checkpoint
from thawed.runtime.compress.pipeline import compress
from thawed.runtime.early import EarlyDecode
from thawed.runtime.format import PAYLOAD_FILE
from thawed.runtime.model import LazyModel, RuntimeConfig
from thawed.runtime.compress.plan import Plan, parse_codec_choice, parse_override

IDS = torch.tensor([[1, 5, 9, 3, 17, 4, 22, 8]])
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def mixed_ckpt(tiny_llama_dir, tmp_path_factory) -> Path:
    """rtn b4 (runs direct), with the MLPs in hyperc and lossless (decoded, resident)."""
    out = tmp_path_factory.mktemp("early") / "mixed"
    plan = Plan(parse_codec_choice("rtn:bits=4,group_size=32"),
                (parse_override("*mlp.up_proj*=hyperc"), parse_override("*mlp.down_proj*=lossless")))
    compress(tiny_llama_dir, out, plan, progress=False)
    return out


def _logits(path: Path, **cfg) -> tuple[torch.Tensor, LazyModel]:
    lm = LazyModel.load(path, RuntimeConfig(device="cpu", **cfg))
    with torch.inference_mode():
        return lm.model(input_ids=IDS).logits, lm


def test_early_decode_gives_the_same_logits_and_is_used(mixed_ckpt):
    ref, lm_off = _logits(mixed_ckpt, early_decode=False)
    got, lm_on = _logits(mixed_ckpt)
    try:
        assert lm_off._early is None
        early = lm_on._early
        assert early is not None and early.taken > 0, "no early result was used"
        assert early.pending() == 0, "results left behind after the first forward"
        assert set(lm_on.modes.values()) >= {"direct", "resident"}
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    finally:
        lm_on.close()
        lm_off.close()


def test_early_decode_is_off_under_a_budget(mixed_ckpt):
    lm = LazyModel.load(mixed_ckpt, RuntimeConfig(device="cpu", cache_budget=10**9))
    try:
        assert lm._early is None
    finally:
        lm.close()


def test_a_damaged_tensor_still_raises_the_runtime_error_naming_it(mixed_ckpt, tmp_path):
    """The worker meets the bad checksum first; the load decodes again and raises it itself."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in mixed_ckpt.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    name = "model.layers.1.mlp.down_proj.weight"  # lossless: decoded, so an early job
    with Checkpoint.open(bad) as c:
        info = c.tensors[f"{name}::{c.index[name].fields[0]}"]
        where = c._header.data_start + info.begin + info.nbytes // 2
    data = bytearray((bad / PAYLOAD_FILE).read_bytes())
    data[where] ^= 0xFF
    (bad / PAYLOAD_FILE).write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as err:
        _logits(bad)
    assert repr(name) in str(err.value)


def test_close_with_jobs_queued_returns_and_drops_them(mixed_ckpt):
    with Checkpoint.open(mixed_ckpt) as ckpt:
        early = EarlyDecode.start(ckpt, CPU, torch.float32, direct=True)
        assert early is not None and early.submitted > 0
        early.close()  # at once: most jobs have not started
        assert early.pending() == 0
        assert early.take_decoded("model.layers.0.mlp.down_proj.weight") is None  # decode it yourself


def test_cuda_gets_no_early_decoder(mixed_ckpt):
    with Checkpoint.open(mixed_ckpt) as ckpt:
        assert EarlyDecode.start(ckpt, torch.device("cuda"), torch.bfloat16, direct=True) is None


def test_a_caller_waiting_on_a_running_job_decodes_the_next_ones_itself():
    """While the worker runs the job the caller needs, the caller runs the queued ones (in order)
    on its own thread and keeps their results for their own takes; a failing stolen job comes back
    as None (decode it again), like a failed worker job."""
    import threading

    release = threading.Event()
    ran: dict[str, str] = {}

    def job(name: str, fail: bool = False):
        def fn():
            if name == "a":
                assert release.wait(10)
            ran[name] = threading.current_thread().name
            if fail:
                raise RuntimeError("damaged")
            return torch.full((2,), float(ord(name)))
        return fn

    early = EarlyDecode([("decoded", "a", job("a")), ("decoded", "b", job("b")), ("decoded", "c", job("c", True)),
                         ("decoded", "d", job("d"))])
    try:
        while "a" not in ran and not early._futures[("decoded", "a")].running():
            pass  # the worker has started on "a"
        threading.Timer(0.5, release.set).start()
        main = threading.current_thread().name
        assert torch.equal(early.take_decoded("a"), torch.full((2,), float(ord("a"))))
        assert ran["a"] != main and ran["b"] == main  # b was decoded here while a ran on the worker
        assert torch.equal(early.take_decoded("b"), torch.full((2,), float(ord("b"))))
        assert early.take_decoded("c") is None  # failed (wherever it ran): the caller decodes it again
        assert torch.equal(early.take_decoded("d"), torch.full((2,), float(ord("d"))))
        assert early.pending() == 0
    finally:
        release.set()
        early.close()
