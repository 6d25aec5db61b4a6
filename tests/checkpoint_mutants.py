"""Damaged and lying checkpoints, and the oracle they must pass (used by tests/test_fuzz_checkpoint.py
and benchmarks/fuzz_checkpoint.py).

A *mutant* is a copy of a good checkpoint folder changed in one way, drawn from a family:

- ``truncate``: the payload cut at a random length (header, data);
- ``bitflip``: one bit flipped in the length prefix, the header JSON or the data;
- ``lie``: one semantic edit of the header (params, shapes, dtypes, codecs, offsets and checksums
  swapped between tensors, names, unknown keys, deep JSON, lone surrogates), the header checksum
  recomputed half of the time so the deeper checks are reached;
- ``forge``: a structural lie with *every* checksum recomputed (a forger who knows format v2), and
  NaN/Inf written into a payload with its checksum recomputed;
- ``config``: config.json edited (bad sizes, heads, activation, layer and vocab counts, unknown
  model_type, not JSON, too deep) or the tokenizer replaced by garbage;
- ``files``: payload missing (a pickle left beside it), a dangling symlink, a FIFO, a folder,
  /dev/zero, /proc/self/mem; config.json a FIFO; marker damaged.

``run_mutant`` puts one through ``inspect`` (open + report + printing) and load + forward. The
oracle: every outcome is a thawed error (``ThawedError``) whose message is one line, or logits
exactly equal to the good checkpoint's. Anything else (another exception, a hang, different
logits) is a failure and is reported with the mutant's description.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from thawed.codecs.errors import ThawedError
from thawed.runtime.format import (
    HEADER_CHECKSUM_KEY,
    MARKER_FILE,
    PAYLOAD_FILE,
    encode_index,
    entry_digest_seed,
    seal_header,
    shared_digest_seed,
)

__all__ = ["Mutant", "Outcome", "make_mutants", "run_mutant", "reference_logits", "FAMILIES", "summarise"]

FAMILIES = ("truncate", "bitflip", "lie", "forge", "config", "files")
IDS = torch.tensor([[1, 5, 9, 3, 17, 4, 22, 8, 11, 2, 6, 30]])


@dataclass(frozen=True)
class Mutant:
    family: str
    what: str
    base: Path  # the good checkpoint folder it is made from
    apply: Callable[[Path], None]  # changes a fresh copy of ``base`` in place


@dataclass(frozen=True)
class Outcome:
    mutant: Mutant
    inspect: str  # "ok" | "error" | "BAD: ..."
    load: str  # "same" | "error" | "BAD: ..."
    message: str

    @property
    def bad(self) -> bool:
        return self.inspect.startswith("BAD") or self.load.startswith("BAD")


# ---- reading and writing payload files ----------------------------------------------------------


def _split(path: Path) -> tuple[dict[str, Any], bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _join(path: Path, header: dict[str, Any], data: bytes, reseal: bool) -> None:
    text = json.dumps(header, separators=(",", ":")).encode()
    if reseal and HEADER_CHECKSUM_KEY in header.get("__metadata__", {}):
        text = seal_header(text)
    text += b" " * (-(8 + len(text)) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _edit(path: Path, fn: Callable[[dict, dict, dict, bytearray], None], reseal: bool,
          recompute: bool = False) -> None:
    """``fn(header, index, meta, data)`` edits in place; optionally every checksum is recomputed."""
    header, data = _split(path)
    buf = bytearray(data)
    meta = header["__metadata__"]
    index = json.loads(meta["index"])
    fn(header, index, meta, buf)
    if recompute:
        _recompute_checksums(header, index, meta, bytes(buf))
    meta["index"] = encode_index(index.items())
    _join(path, header, bytes(buf), reseal or recompute)


def _recompute_checksums(header: dict, index: dict, meta: dict, data: bytes) -> None:
    def crc(keys: list[str], seed: int) -> str:
        c = seed
        for k in keys:
            t = header.get(k)
            if isinstance(t, dict) and isinstance(t.get("data_offsets"), list):
                b, e = t["data_offsets"]
                c = zlib.crc32(data[b:e], c)
        return f"crc32:{c & 0xFFFFFFFF:08x}"

    for name, e in index.items():
        if isinstance(e, dict) and isinstance(e.get("fields"), list):
            e["checksum"] = crc([f"{name}::{f}" for f in e["fields"]], entry_digest_seed(name, e))
    shared, sums = json.loads(meta["shared"]), {}
    for codec, ids in shared.items():
        keys = [f"{sid}.{p}" for sid, ps in ids.items() for p in ps]
        infos = [header[f"__codec__.{codec}.{k}"] for k in keys]
        seed = shared_digest_seed(codec, ((k, i["dtype"], tuple(i["shape"])) for k, i in zip(keys, infos)))
        sums[codec] = crc([f"__codec__.{codec}.{k}" for k in keys], seed)
    meta["shared_checksums"] = json.dumps(sums, sort_keys=True, separators=(",", ":"))


# ---- the families ---------------------------------------------------------------------------------


def _payload(folder: Path) -> Path:
    return folder / PAYLOAD_FILE


def _truncate(rng: random.Random, base: Path) -> Mutant:
    size = _payload(base).stat().st_size
    (n,) = struct.unpack("<Q", _payload(base).read_bytes()[:8])
    cut = rng.choice([rng.randrange(0, 8 + n), rng.randrange(8 + n, size)])

    def apply(folder: Path) -> None:
        with open(_payload(folder), "r+b") as f:
            f.truncate(cut)

    return Mutant("truncate", f"payload cut to {cut} of {size} bytes", base, apply)


def _bitflip(rng: random.Random, base: Path) -> Mutant:
    blob = _payload(base).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    region = rng.choice(["prefix", "header", "data"])
    lo, hi = {"prefix": (0, 8), "header": (8, 8 + n), "data": (8 + n, len(blob))}[region]
    pos, bit = rng.randrange(lo, hi), rng.randrange(8)

    def apply(folder: Path) -> None:
        b = bytearray(_payload(folder).read_bytes())
        b[pos] ^= 1 << bit
        _payload(folder).write_bytes(bytes(b))

    return Mutant("bitflip", f"bit {bit} of byte {pos} flipped ({region})", base, apply)


def _pick(rng: random.Random, index: dict, pred: Callable[[str, dict], bool] = lambda n, e: True) -> str | None:
    names = [n for n, e in index.items() if pred(n, e)]
    return rng.choice(names) if names else None


def _lie_edits(rng: random.Random) -> list[tuple[str, Callable[[dict, dict, dict, bytearray], None]]]:
    """(description, edit) pairs; each edit draws its target with ``rng`` when applied."""
    r = random.Random(rng.random())

    def param_edit(h, i, m, d):
        name = _pick(r, i, lambda n, e: bool(e["params"]) and e["codec"] != "raw")
        if name is None:
            return
        p = i[name]["params"]
        key = r.choice(sorted(p))
        v = p[key]
        if isinstance(v, bool):
            p[key] = not v
        elif isinstance(v, int):
            p[key] = r.choice([v + 1, v - 1, v * 2, 0, -1, 2**40, str(v), None])
        elif isinstance(v, list):
            p[key] = r.choice([v[:-1], v + [0], [x + 1 if isinstance(x, int) else x for x in v], {}])
        else:
            p[key] = r.choice([None, 1, "x", [v]])

    def group_size_plus_one(h, i, m, d):  # the 32 -> 33: same group count, other meaning
        name = _pick(r, i, lambda n, e: e["codec"] in ("rtn", "hyperc") and "group_size" in e["params"])
        if name is not None:
            i[name]["params"]["group_size"] += 1

    def unknown_param(h, i, m, d):
        name = _pick(r, i)
        i[name]["params"]["surprise"] = 1

    def swap_tensors(h, i, m, d):
        same: dict[tuple, list[str]] = {}
        for n, e in i.items():
            same.setdefault((e["codec"], tuple(e["shape"]), json.dumps(e["params"], sort_keys=True)), []).append(n)
        groups = [g for g in same.values() if len(g) > 1]
        if not groups:
            return
        a, b = r.sample(r.choice(groups), 2)
        for f in i[a]["fields"]:
            h[f"{a}::{f}"]["data_offsets"], h[f"{b}::{f}"]["data_offsets"] = \
                h[f"{b}::{f}"]["data_offsets"], h[f"{a}::{f}"]["data_offsets"]
        i[a]["checksum"], i[b]["checksum"] = i[b]["checksum"], i[a]["checksum"]

    def shape_edit(h, i, m, d):
        name = _pick(r, i)
        s = i[name]["shape"]
        if s:
            s[r.randrange(len(s))] += r.choice([1, -1])

    def dtype_edit(h, i, m, d):
        name = _pick(r, i)
        i[name]["dtype"] = r.choice(["float16", "bfloat16", "float32", "int8", "complex64"])

    def codec_edit(h, i, m, d):
        name = _pick(r, i)
        i[name]["codec"] = r.choice(["raw", "rtn", "lossless", "cvxq", "hyperc", "nwc", "see", "nope"])

    def version_edit(h, i, m, d):
        name = _pick(r, i)
        i[name]["codec_version"] = r.choice([0, 2, 99, "1", 1.0])

    def fields_edit(h, i, m, d):
        name = _pick(r, i)
        f = i[name]["fields"]
        i[name]["fields"] = r.choice([f[::-1] if len(f) > 1 else f + ["x"], f[:-1], f + f[:1]])

    def role_edit(h, i, m, d):
        name = _pick(r, i)
        i[name]["role"] = r.choice(["linear", "embedding", "lm_head", "other", "boss"])

    def rename(h, i, m, d):
        name = _pick(r, i)
        new = r.choice(["\ud800x", "a\nb", name + "x", "__codec__.x", "a::b", "x" * 2000])
        i[new] = i.pop(name)
        for f in i[new]["fields"]:
            h[f"{new}::{f}"] = h.pop(f"{name}::{f}")

    def offsets_edit(h, i, m, d):
        key = r.choice([k for k in h if k != "__metadata__"])
        b, e = h[key]["data_offsets"]
        h[key]["data_offsets"] = r.choice([[b + 1, e + 1], [b, e + 8], [e, b], [-1, e]])

    def deep_json(h, i, m, d):
        depth = r.choice([40, 700, 5000])
        m["settings"] = "[" * depth + "]" * depth

    def deep_params(h, i, m, d):
        name = _pick(r, i)
        v: Any = 1
        for _ in range(r.choice([40, 700])):
            v = [v]
        i[name]["params"]["deep"] = v

    def meta_edit(h, i, m, d):
        key = r.choice(["format", "format_version", "shared", "source", "index"])
        m[key] = r.choice(["", "2", "3", "{}", "\x1b[2J", "[1]", "1" * 20])

    return [("a param edited", param_edit), ("group_size g -> g+1 (rtn 32 -> 33)", group_size_plus_one),
            ("an unknown param added", unknown_param), ("two tensors' offsets and checksums swapped", swap_tensors),
            ("an index shape edited", shape_edit), ("an index dtype edited", dtype_edit),
            ("an entry's codec changed", codec_edit), ("codec_version edited", version_edit),
            ("an entry's fields edited", fields_edit), ("a role edited", role_edit), ("a tensor renamed", rename),
            ("data_offsets edited", offsets_edit), ("settings nested deeply", deep_json),
            ("params nested deeply", deep_params), ("a metadata value edited", meta_edit)]


def _lie(rng: random.Random, base: Path) -> Mutant:
    what, fn = rng.choice(_lie_edits(rng))
    reseal = rng.random() < 0.5
    return Mutant("lie", f"{what}, header checksum {'recomputed' if reseal else 'left stale'}", base,
                  lambda folder: _edit(_payload(folder), fn, reseal))


def _forge(rng: random.Random, base: Path) -> Mutant:
    """Structural lies with every checksum recomputed, and NaN/Inf injected into a float field."""
    r = random.Random(rng.random())

    def nonfinite(h, i, m, d):
        keys = [k for k, t in h.items() if k != "__metadata__" and t["dtype"] in ("F16", "F32", "BF16")
                and t["data_offsets"][1] > t["data_offsets"][0]]
        key = r.choice(keys)
        t = h[key]
        size = {"F16": 2, "BF16": 2, "F32": 4}[t["dtype"]]
        b, e = t["data_offsets"]
        at = b + size * r.randrange((e - b) // size)
        bits = {("F16", 0): b"\x00\x7e", ("F16", 1): b"\x00\x7c", ("BF16", 0): b"\xc0\x7f",
                ("BF16", 1): b"\x80\x7f", ("F32", 0): b"\x00\x00\xc0\x7f", ("F32", 1): b"\x00\x00\x80\x7f"}
        d[at:at + size] = bits[(t["dtype"], r.randrange(2))]

    structural = [(w, f) for w, f in _lie_edits(r) if w in (
        "an unknown param added", "an index shape edited", "an index dtype edited", "an entry's fields edited",
        "params nested deeply")]
    what, fn = r.choice(structural + [("NaN/Inf written into a float field", nonfinite)] * 3)
    return Mutant("forge", f"{what}, every checksum recomputed", base,
                  lambda folder: _edit(_payload(folder), fn, True, recompute=True))


def _config(rng: random.Random, base: Path) -> Mutant:
    cfg = json.loads((base / "config.json").read_text())
    layers = cfg.get("num_hidden_layers", 2)
    edits: list[tuple[str, Any]] = [
        ("num_attention_heads", 0), ("num_attention_heads", 3), ("num_hidden_layers", -1),
        ("num_hidden_layers", layers - 1), ("num_hidden_layers", layers + 1), ("num_hidden_layers", 10**7),
        ("hidden_act", "nope"), ("hidden_size", 2**40), ("hidden_size", cfg.get("hidden_size", 64) + 1),
        ("vocab_size", cfg.get("vocab_size", 100) - 1), ("vocab_size", 0), ("intermediate_size", 2**40),
        ("num_key_value_heads", 3), ("model_type", "nope"), ("head_dim", 0), ("hidden_size", "64"),
        ("max_position_embeddings", 2**62), ("tie_word_embeddings", not cfg.get("tie_word_embeddings", True)),
    ]
    kind = rng.randrange(len(edits) + 4)
    if kind < len(edits):
        key, value = edits[kind]

        def apply(folder: Path) -> None:
            c = json.loads((folder / "config.json").read_text())
            c[key] = value
            (folder / "config.json").write_text(json.dumps(c))

        return Mutant("config", f"config.json {key}={value!r}", base, apply)
    text, what, target = [
        ("{not json", "config.json not JSON", "config.json"),
        ("[" * 5000 + "]" * 5000, "config.json nested 5000 deep", "config.json"),
        ("[1, 2]", "config.json not an object", "config.json"),
        ('{"version": "1.0", "model": {"type": "BPE", "vocab": 7}}', "tokenizer.json garbage", "tokenizer.json"),
    ][kind - len(edits)]

    def apply_text(folder: Path) -> None:
        (folder / target).write_text(text)

    return Mutant("config", what, base, apply_text)


def _files(rng: random.Random, base: Path) -> Mutant:
    def repoint(target: str) -> Callable[[Path], None]:
        def apply(folder: Path) -> None:
            os.unlink(_payload(folder))
            os.symlink(target, _payload(folder))
        return apply

    def fifo(name: str) -> Callable[[Path], None]:
        def apply(folder: Path) -> None:
            os.unlink(folder / name)
            os.mkfifo(folder / name)
        return apply

    def missing_with_pickle(folder: Path) -> None:
        os.unlink(_payload(folder))
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not a real pickle")

    def payload_dir(folder: Path) -> None:
        os.unlink(_payload(folder))
        os.mkdir(_payload(folder))

    def marker_garbage(folder: Path) -> None:
        (folder / MARKER_FILE).write_text("[" * 100 + "]" * 100)

    def marker_only(folder: Path) -> None:
        os.unlink(_payload(folder))

    def config_symlink(target: str) -> Callable[[Path], None]:
        def apply(folder: Path) -> None:
            os.unlink(folder / "config.json")
            os.symlink(target, folder / "config.json")
        return apply

    def harmless(folder: Path) -> None:  # must still load, identically
        (folder / "README.md").write_text("notes")

    choices = [("payload missing, a pickle beside it", missing_with_pickle),
               ("payload a dangling symlink", repoint("/nonexistent/x")),
               ("payload a FIFO", fifo(PAYLOAD_FILE)), ("payload a folder", payload_dir),
               ("payload -> /dev/zero", repoint("/dev/zero")), ("payload -> /proc/self/mem", repoint("/proc/self/mem")),
               ("config.json a FIFO", fifo("config.json")), ("config.json -> /dev/zero", config_symlink("/dev/zero")),
               ("tokenizer.json a FIFO", fifo("tokenizer.json")), ("marker nested deep", marker_garbage),
               ("marker without payload", marker_only), ("an extra README (harmless)", harmless)]
    what, fn = rng.choice(choices)
    return Mutant("files", what, base, fn)


_MAKERS = {"truncate": _truncate, "bitflip": _bitflip, "lie": _lie, "forge": _forge, "config": _config,
           "files": _files}


def make_mutants(bases: list[Path], counts: dict[str, int], seed: int) -> list[Mutant]:
    """``counts[family]`` mutants of each family, each from a base drawn with a seeded RNG."""
    rng = random.Random(seed)
    return [_MAKERS[fam](rng, rng.choice(bases)) for fam in FAMILIES for _ in range(counts.get(fam, 0))]


# ---- the oracle -----------------------------------------------------------------------------------


class _Hang(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise _Hang()


def _classify(exc: BaseException) -> tuple[str, str]:
    msg = str(exc)
    if isinstance(exc, _Hang):
        return "BAD: hang", "no answer within the time limit"
    if not isinstance(exc, ThawedError):
        return f"BAD: traceback {type(exc).__name__}", msg[:300]
    if "\n" in msg or not msg.strip():
        return "BAD: multi-line error", msg[:300]
    return "error", msg


def reference_logits(folder: Path, ids: torch.Tensor = IDS) -> torch.Tensor:
    from thawed.runtime.loading import load_for_inference
    from thawed.runtime.model import RuntimeConfig

    loaded = load_for_inference(folder, RuntimeConfig(device="cpu", prefetch_layers=0))
    try:
        with torch.inference_mode():
            return loaded.model(input_ids=ids).logits.clone()
    finally:
        loaded.close()


def run_mutant(m: Mutant, work: Path, want: dict[Path, torch.Tensor], ids: torch.Tensor = IDS,
               limit_s: int = 60) -> Outcome:
    """Copy the base, apply the mutant, then run inspect and load + forward under ``limit_s`` each."""
    from thawed.runtime.checkpoint import Checkpoint
    from thawed.runtime.inspection import format_inspect, inspect_checkpoint
    from thawed.runtime.loading import load_for_inference
    from thawed.runtime.model import RuntimeConfig

    folder = work / "m"
    if os.path.lexists(folder):
        shutil.rmtree(folder)
    shutil.copytree(m.base, folder, symlinks=True)
    m.apply(folder)
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        signal.alarm(limit_s)
        try:
            with Checkpoint.open(folder) as ckpt:
                report = inspect_checkpoint(ckpt)
            out = format_inspect(report) + json.dumps(report, ensure_ascii=False)
            out.encode("utf-8")  # what printing it needs
            ins, ins_msg = "ok", ""
        except BaseException as exc:  # noqa: BLE001 - classify everything, KeyboardInterrupt aside
            if isinstance(exc, KeyboardInterrupt):
                raise
            ins, ins_msg = _classify(exc)
        signal.alarm(limit_s)
        try:
            loaded = load_for_inference(folder, RuntimeConfig(device="cpu", prefetch_layers=0))
            try:
                with torch.inference_mode():
                    got = loaded.model(input_ids=ids).logits
            finally:
                loaded.close()
            load = "same" if torch.equal(got, want[m.base]) else \
                f"BAD: silent wrong load (max |diff| {float((got - want[m.base]).abs().nan_to_num(1e9).max()):.3g})"
            msg = ""
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, KeyboardInterrupt):
                raise
            load, msg = _classify(exc)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return Outcome(m, ins, load, msg or ins_msg)


def summarise(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    """Per family: how many mutants, typed errors, identical loads, and bad outcomes."""
    table: dict[str, dict[str, int]] = {}
    for o in outcomes:
        row = table.setdefault(o.mutant.family, {"mutants": 0, "load_error": 0, "load_same": 0,
                                                 "inspect_error": 0, "inspect_ok": 0, "bad": 0})
        row["mutants"] += 1
        row["bad"] += o.bad
        row["load_error"] += o.load == "error"
        row["load_same"] += o.load == "same"
        row["inspect_error"] += o.inspect == "error"
        row["inspect_ok"] += o.inspect == "ok"
    total = {k: sum(r[k] for r in table.values()) for k in next(iter(table.values()), {})}
    table["total"] = total
    return table
