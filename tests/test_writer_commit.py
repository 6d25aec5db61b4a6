"""The writer's one commit point, shown with real processes: SIGKILL during ``compress`` at five
points never leaves a loadable half-checkpoint and the next compress names the leftover; a
checkpoint written by root loads as another uid (the container's 10001)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from models_fixtures import tiny_llama_dir  # noqa: F401

from thawed.codecs import ThawedError
from thawed.runtime.cli import main
from thawed.runtime.compress.pipeline import compress
from thawed.runtime.compress.plan import Plan, parse_codec_choice
from thawed.runtime.compress.writer import partial_folders
from thawed.runtime.errors import WriterError
from thawed.runtime.format import MARKER_FILE
from thawed.runtime.loading import load_for_inference
from thawed.runtime.model import RuntimeConfig

CPU = RuntimeConfig(device="cpu", prefetch_layers=0)
IDS = torch.tensor([[1, 5, 9, 3, 17]])

# Runs compress in a child that SIGKILLs itself at one point of the writer.
_KILLER = textwrap.dedent("""
    import os, shutil, signal, sys
    from thawed.runtime.compress import writer
    from thawed.runtime.compress.pipeline import compress
    from thawed.runtime.compress.plan import Plan, parse_codec_choice

    src, out, point = sys.argv[1], sys.argv[2], sys.argv[3]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    calls = {"n": 0}

    def after(n, fn):
        def wrapped(*a, **k):
            calls["n"] += 1
            if calls["n"] == n:
                die()
            return fn(*a, **k)
        return wrapped

    if point == "adding":            # some tensors' fields written, others not yet
        writer._Group.write = after(5, writer._Group.write)
    elif point == "payload-written":  # the payload file complete in the temporary folder, nothing else
        writer.CheckpointWriter._copy_config_files = lambda self: die()
    elif point == "copying-config":   # some config/tokenizer files copied, not all
        shutil.copyfile = after(2, shutil.copyfile)
    elif point == "marker-written":   # everything in place in the temporary folder, modes not yet set
        orig = writer.CheckpointWriter._write_marker
        writer.CheckpointWriter._write_marker = lambda self: (orig(self), die())
    elif point == "before-rename":    # the last instant before the commit point
        os.rename = lambda *a, **k: die()
    compress(src, out, Plan(parse_codec_choice("rtn:bits=4,group_size=32"), ()), progress=False)
    print("finished without being killed")
""")

POINTS = ["adding", "payload-written", "copying-config", "marker-written", "before-rename"]


@pytest.fixture(scope="module")
def good_logits(tiny_llama_dir, tmp_path_factory) -> torch.Tensor:
    out = tmp_path_factory.mktemp("good") / "ck"
    compress(tiny_llama_dir, out, Plan(parse_codec_choice("rtn:bits=4,group_size=32"), ()), progress=False)
    return _logits(out)


def _logits(folder: Path) -> torch.Tensor:
    loaded = load_for_inference(folder, CPU)
    try:
        with torch.inference_mode():
            return loaded.model(input_ids=IDS).logits.clone()
    finally:
        loaded.close()


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_during_compress_never_leaves_a_loadable_half_checkpoint(point, tiny_llama_dir, tmp_path,
                                                                         good_logits, capsys):
    out = tmp_path / "ck"
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(tiny_llama_dir), str(out), point],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, (proc.returncode, proc.stdout, proc.stderr[-2000:])

    # Nothing at OUT: it cannot be loaded, and no error is a traceback.
    assert not os.path.lexists(out)
    with pytest.raises(ThawedError):
        load_for_inference(out, CPU)
    # The work in progress sits in one hidden sibling folder; if it loads at all, it is whole.
    (leftover,) = partial_folders(out)
    assert leftover.name.startswith(".ck.thawed-partial-") and leftover.is_dir()
    try:
        got = _logits(leftover)
    except ThawedError:
        pass
    else:
        assert point in ("marker-written", "before-rename") and torch.equal(got, good_logits)

    # The next compress names the leftover, in one line, and writes nothing.
    with pytest.raises(WriterError, match="left over from an interrupted") as info:
        compress(tiny_llama_dir, out, Plan(parse_codec_choice("rtn:bits=4,group_size=32"), ()), progress=False)
    assert str(leftover) in str(info.value) and "\n" not in str(info.value)
    assert main(["compress", str(tiny_llama_dir), str(out), "--codec", "rtn:bits=4,group_size=32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and leftover.name in err and "rm -r" in err, err
    assert not os.path.lexists(out)

    # Deleting it, as the message says, lets compress finish; the result loads like the good one.
    shutil.rmtree(leftover)
    compress(tiny_llama_dir, out, Plan(parse_codec_choice("rtn:bits=4,group_size=32"), ()), progress=False)
    assert partial_folders(out) == [] and (out / MARKER_FILE).is_file()
    assert torch.equal(_logits(out), good_logits)


_AS_OTHER_UID = textwrap.dedent("""
    import json, os, sys, torch
    from thawed.runtime.loading import load_for_inference
    from thawed.runtime.model import RuntimeConfig

    def logits(folder):
        loaded = load_for_inference(folder, RuntimeConfig(device="cpu", prefetch_layers=0))
        try:
            with torch.inference_mode():
                return loaded.model(input_ids=torch.tensor([[1, 5, 9, 3, 17]])).logits
        finally:
            loaded.close()

    warm = logits(sys.argv[1])  # as root: every lazy import done before giving up the privileges
    os.setgroups([])
    os.setgid(10001)
    os.setuid(10001)
    assert os.geteuid() == 10001 and os.getegid() == 10001
    try:
        got = logits(sys.argv[2])
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        sys.exit(3)
    print(json.dumps({"equal": bool(torch.equal(got, warm))}))
""")


def _run_as_10001(warm: Path, target: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HOME=str(target.parent), HF_HOME=str(target.parent / "hf"), TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", _AS_OTHER_UID, str(warm), str(target)], capture_output=True,
                          text=True, timeout=300, env=env)


def test_checkpoint_written_by_root_loads_as_uid_10001(tiny_llama_dir, tmp_path):
    old = os.umask(0o022)
    try:
        shared = Path(tempfile.mkdtemp(prefix="thawed-uid-", dir="/tmp"))
        os.chmod(shared, 0o755)
        compress(tiny_llama_dir, shared / "ck", Plan(parse_codec_choice("rtn:bits=4,group_size=32"), ()),
                 progress=False)
    finally:
        os.umask(old)
    try:
        ck = shared / "ck"
        assert stat.S_IMODE(ck.stat().st_mode) == 0o755
        for p in ck.iterdir():
            assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
        if os.geteuid() != 0:
            pytest.skip("setuid needs root; the file modes above are the check")
        warm = Path(shutil.copytree(ck, tmp_path / "warm"))
        proc = _run_as_10001(warm, ck)
        assert proc.returncode == 0, (proc.stdout, proc.stderr[-3000:])
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"equal": True}

        # The control: files written 0600 (what mkstemp gave before) are refused, as one typed error.
        private = Path(shutil.copytree(ck, shared / "private"))
        for p in private.iterdir():
            os.chmod(p, 0o600)
        proc = _run_as_10001(warm, private)
        assert proc.returncode == 3, (proc.stdout, proc.stderr[-3000:])
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        assert "cannot be read" in res["message"] and "Permission denied" in res["message"], res
        assert str(private) in res["message"], res  # names the file it could not read
    finally:
        shutil.rmtree(shared, ignore_errors=True)
