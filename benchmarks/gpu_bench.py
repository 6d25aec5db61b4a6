"""Everything there is to measure on a GPU, in one process (benchmarks/gpu_check.sh runs it).

Sections, in order, each timed and each guarded (a failure is recorded, the rest still runs; a
section that would start past --deadline seconds is skipped and says so):

1. ``copy``: device-to-device copy bandwidth (bytes read + written), the ceiling for the rest.
2. ``correct``: every codec's Triton decode against its PyTorch reference (the CPU decode of the
   same payload), and every fused matmul against ``F.linear`` over the reference weight, on odd
   and real shapes. A codec that fails here is left out of the timings.
3. ``decode``: decode GB/s per codec and shape (payload bytes read + bf16 bytes written, as the
   copy counts), next to the copy bandwidth, median of CUDA-event timings.
4. ``gemv``: the fused decode-matmul against bf16 ``F.linear`` at 1, 8 and 16 rows, on SmolLM2's
   shapes and 4096x11008, with the weight bytes of each.
5. ``e2e``: ms per token at batch 1 and 8 for a SmolLM2-shaped model (random weights, seeded: speed
   does not depend on the values; --real adds the real SmolLM2 checkpoint when one is given):
   dense bf16 transformers eager and torch.compile'd, and thawed warm (resident bf16, CUDA graphs),
   compressed-resident (direct, Triton kernels) and streaming at a 25 % budget; greedy tokens of
   the graphed and eager paths compared first.

``--dry-run`` runs the same code paths on the CPU with tiny shapes (Triton's interpreter, a two-
layer model): it checks the script, not the speed. Writes one JSON file (--json).

  python benchmarks/gpu_bench.py --json $OUT/gpu_check.json          # on the GPU machine
  TRITON_INTERPRET=1 python benchmarks/gpu_bench.py --dry-run         # here
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CASES = ("rtn", "cvxq", "hyperc", "lossless", "nwc")
FUSED = ("rtn", "cvxq", "hyperc")
# decodes whose capture failed in run 2 of 2026-11-30 (lossless: its integrity check's host sync,
# which timing now skips as the runtime's re-decodes do; nwc: host-side work on every call): timed
# by launches. A failed capture also left PyTorch's CUDA generator unusable for the rest of that
# process (every later torch.randn on the device raised), so none is attempted until one has run.
UNCAPTURABLE = ("lossless", "nwc")
SMOL_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
BIG = (4096, 11008)
SMOL_CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                   rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                   bos_token_id=1, eos_token_id=2, pad_token_id=2)
TINY_CONFIG = dict(SMOL_CONFIG, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


# seconds a section may start new work for (then it stops, says so, and the next section runs)
SECTION_BUDGET = {"correct": 70.0, "decode": 60.0, "gemv": 60.0, "sweep": 60.0}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = args.dry_run
        self.dev = torch.device("cpu" if self.dry else "cuda")
        self.t0 = time.perf_counter()
        self.result: dict[str, Any] = {"command": " ".join(sys.argv), "dry_run": self.dry, "sections": {}}
        self.ok_codecs: list[str] = []

    # ---- plumbing -------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def section(self, name: str, fn: Callable[[], Any]) -> None:
        if self.elapsed() > self.args.deadline:
            self.result["sections"][name] = {"skipped": f"past the {self.args.deadline:.0f} s deadline"}
            print(f"[{name}] skipped: past the deadline", flush=True)
            return
        t = time.perf_counter()
        self.section_end = self.elapsed() + self.args.budgets.get(name, 1e9) * (2 if self.dry else 1)
        print(f"[{name}] start at {self.elapsed():.1f} s", flush=True)
        try:
            out = fn()
            self.result["sections"][name] = {"seconds": round(time.perf_counter() - t, 2), "result": out}
        except Exception as exc:  # noqa: BLE001 - record and go on: device time is scarce
            traceback.print_exc()
            self.result["sections"][name] = {"seconds": round(time.perf_counter() - t, 2),
                                             "error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(f"[{name}] done in {time.perf_counter() - t:.1f} s", flush=True)
        self.save()

    def save(self) -> None:
        if self.args.json:
            Path(self.args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.json).write_text(json.dumps(self.result, indent=1, default=str))

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def time_ms(self, fn: Callable[[], Any], reps: int | None = None) -> float:
        """Median milliseconds of ``fn`` (CUDA events on the GPU; perf_counter on the CPU)."""
        reps = reps or (3 if self.dry else self.args.reps)
        for _ in range(2 if self.dry else 5):
            fn()
        self.sync()
        times = []
        if self.dev.type == "cuda":
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
        else:
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    def time_graph_ms(self, fn: Callable[[], Any], per_graph: int = 20) -> tuple[float, bool]:
        """Median milliseconds of one ``fn`` call replayed from a CUDA graph of ``per_graph`` calls
        (launch gaps out of the figure, as METHOD.md advises for small kernels), and whether the
        graph worked; falls back to plain event timing where capture fails (and says so)."""
        if self.dev.type != "cuda":
            return self.time_ms(fn), False
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(per_graph):
                    fn()
        except Exception as exc:  # noqa: BLE001
            print(f"    (graph capture failed: {type(exc).__name__}: {str(exc)[:120]}; timing launches)", flush=True)
            torch.cuda.synchronize()
            return self.time_ms(fn), False
        return self.time_ms(g.replay, reps=max(5, self.args.reps // 5)) / per_graph, True

    def over(self) -> bool:
        """Whether this section's time budget (SECTION_BUDGET) or the whole deadline has run out."""
        return self.elapsed() > min(self.section_end, self.args.deadline)

    def codecs(self) -> list[str]:
        """The codecs this run checks and times (``--codecs``, default every case)."""
        return [c for c in CASES if c in self.args.codecs.split(",")]

    def shapes(self) -> list[tuple[int, int]]:
        if self.dry:
            return [(17, 100), (64, 256)]
        return [BIG] + SMOL_SHAPES[::-1]  # the large shape first: it carries the targets

    # ---- 1. copy --------------------------------------------------------------------------------
    def copy(self) -> dict:
        n = (1 << 16) if self.dry else (1 << 30)  # 2 GiB of bf16
        a = torch.randn(n, device=self.dev, dtype=torch.bfloat16)
        b = torch.empty_like(a)
        ms = self.time_ms(lambda: b.copy_(a), reps=20)
        gbs = 2 * a.numel() * 2 / ms / 1e6
        self.copy_gbs = gbs
        info = {"bytes": 2 * a.numel() * 2, "ms": ms, "GB_per_s": gbs}
        if self.dev.type == "cuda":
            p = torch.cuda.get_device_properties(self.dev)
            info.update(name=p.name, sms=p.multi_processor_count, memory_GiB=p.total_memory / 2**30)
        return info

    # ---- cases ----------------------------------------------------------------------------------
    def case(self, name: str):
        return importlib.import_module(f"gpu_case_{name}")

    def payload(self, name: str, shape: tuple[int, int], seed: int = 0):
        return self.case(name).payload(shape, self.dev, seed)

    @staticmethod
    def kernel(name: str):
        try:
            return importlib.import_module(f"thawed.codecs.kernels.{name}")
        except ImportError:
            return None

    def decode_fast(self, name: str, enc, spec, shared, dtype, out=None, **kw):
        """The device decode of a payload: the kernel module's decode where there is one (``kw`` goes
        to it), else the codec's decode on this device (which dispatches to its kernels)."""
        from thawed.codecs import get_codec

        mod = self.kernel(name)
        if mod is not None and hasattr(mod, "decode"):
            return mod.decode(enc, spec, dtype, out=out, shared=shared, **kw)
        return get_codec(name).decode(enc, spec, shared, self.dev, dtype)

    def reference(self, name: str, enc, spec, shared) -> torch.Tensor:
        """The PyTorch reference: the codec's decode of the same payload on the CPU, in fp32."""
        from thawed.codecs import get_codec

        cpu_shared = {k: v.cpu() for k, v in (shared or {}).items()}
        return get_codec(name).decode(enc.to("cpu"), spec, cpu_shared, torch.device("cpu"), torch.float32)

    @staticmethod
    def payload_bytes(enc) -> int:
        return sum(t.numel() * t.element_size() for t in enc.fields.values())

    # ---- 2. correctness -------------------------------------------------------------------------
    def correct(self) -> dict:
        out: dict[str, Any] = {}
        shapes = [(17, 100), (33, 257)] + ([] if self.dry else [(576, 576), (1536, 576)])
        for name in self.codecs():
            rows = []
            if self.over():
                out[name] = {"ok": False, "error": "not checked: the section's time ran out", "checks": rows}
                continue
            try:
                for shape in shapes:
                    enc, spec, shared = self.payload(name, shape, seed=len(rows) + 1)
                    ref = self.reference(name, enc, spec, shared)
                    for dtype in (torch.float32, torch.bfloat16):
                        got = torch.full(spec.shape, float("nan"), dtype=dtype, device=self.dev)
                        got = self.decode_fast(name, enc, spec, shared, dtype, out=got)
                        g = got.float().cpu()
                        finite = bool(torch.isfinite(g).all())
                        err = float((g - ref.to(dtype).float()).norm() / ref.norm().clamp_min(1e-12))
                        tol = 1e-6 if dtype == torch.float32 else 1e-2
                        rows.append({"shape": list(shape), "dtype": str(dtype), "rel_err": err,
                                     "finite": finite, "ok": finite and err <= tol})
                    mod = self.kernel(name)
                    if name in FUSED and mod is not None and hasattr(mod, "prepare"):
                        w = mod.prepare(enc, spec)
                        for m in (1, 5, 16):
                            x = torch.randn(m, spec.shape[1], device=self.dev, dtype=torch.bfloat16)
                            y = mod.matmul(x, w).float().cpu()
                            yr = F.linear(x.float().cpu(), ref)
                            err = float((y - yr).norm() / yr.norm().clamp_min(1e-12))
                            finite = bool(torch.isfinite(y).all())
                            rows.append({"shape": list(shape), "matmul_rows": m, "rel_err": err, "finite": finite,
                                         "ok": finite and err <= 2e-2})
                out[name] = {"ok": all(r["ok"] for r in rows), "checks": rows}
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:1000], "checks": rows}
            if out[name]["ok"]:
                self.ok_codecs.append(name)
            print(f"  {name}: {'ok' if out[name]['ok'] else 'FAILED'} "
                  f"(worst rel err {max((r['rel_err'] for r in rows), default=float('nan')):.2e})", flush=True)
        return out

    # ---- 3. decode speed ------------------------------------------------------------------------
    def decode(self) -> dict:
        out: dict[str, Any] = {}
        copy = getattr(self, "copy_gbs", float("nan"))
        for name in self.ok_codecs:
            rows = []
            # as the runtime re-decodes an already validated payload (lossless: check=False, no host
            # sync); decided once, outside the timed calls
            mod = self.kernel(name)
            kw = ({"check": False} if mod is not None and hasattr(mod, "decode")
                  and "check" in inspect.signature(mod.decode).parameters else {})
            for shape in self.shapes():
                if self.over():
                    rows.append({"shape": list(shape), "error": "skipped: the section's time ran out"})
                    continue
                if name == "nwc" and shape == BIG and not self.args.big_nwc:
                    continue  # encoding 45 M weights with nwc takes minutes; SmolLM2's shapes say enough
                try:
                    enc, spec, shared = self.payload(name, shape)
                    buf = torch.empty(spec.shape, dtype=torch.bfloat16, device=self.dev)
                    def run() -> Any:
                        return self.decode_fast(name, enc, spec, shared, torch.bfloat16, out=buf, **kw)

                    if name in UNCAPTURABLE:
                        ms, graphed = self.time_ms(run), False
                    else:
                        ms, graphed = self.time_graph_ms(run)
                    launch_ms = self.time_ms(run)
                    nbytes = self.payload_bytes(enc) + buf.numel() * 2
                    gbs = nbytes / ms / 1e6
                    from thawed.codecs import get_codec

                    try:  # the PyTorch decoder on the same device: what the kernel replaces
                        ref_ms = self.time_ms(lambda: get_codec(name).decode(enc, spec, shared, self.dev,
                                                                            torch.bfloat16, fast=False), reps=5)
                    except Exception as exc:  # noqa: BLE001
                        ref_ms = f"{type(exc).__name__}: {exc}"[:200]
                    rows.append({"shape": list(shape), "ms": ms, "graphed": graphed, "ms_with_launch": launch_ms,
                                 "pytorch_decoder_ms": ref_ms,
                                 "GB_per_s": gbs, "pct_of_copy": 100 * gbs / copy,
                                 "payload_bits_per_weight": 8 * self.payload_bytes(enc) / buf.numel()})
                except Exception as exc:  # noqa: BLE001
                    rows.append({"shape": list(shape), "error": f"{type(exc).__name__}: {exc}"[:500]})
            out[name] = rows
            best = max((r.get("pct_of_copy", 0) for r in rows), default=0)
            print(f"  {name}: best {best:.1f}% of copy", flush=True)
        return out

    # ---- 4. fused GEMV --------------------------------------------------------------------------
    def copies(self, mod, enc, spec, w, dense) -> tuple[list, list]:
        """Copies of a prepared weight and of its bf16 decode to rotate over: together their bytes
        pass the L2 (60 MB on an H200) several times, so that the timing reads memory, not the cache
        (METHOD.md); SmolLM2's small shapes stay in L2 with any practical number of copies."""
        l2 = 3 * 60e6 if not self.dry else 0
        nw = max(1, min(16, int(-(-l2 // int(w.nbytes)))))
        nd = max(1, min(16, int(-(-l2 // (dense.numel() * 2)))))
        ws = [w] + [mod.prepare(type(enc)({k: v.clone() for k, v in enc.fields.items()}, enc.params), spec)
                    for _ in range(nw - 1)]
        return ws, [dense] + [dense.clone() for _ in range(nd - 1)]

    def per_copy_ms(self, fn: Callable[[Any], Any], copies: list) -> float:
        """Milliseconds of one ``fn(copy)``, from CUDA graphs of calls over every copy in turn."""
        return self.time_graph_ms(lambda: [fn(c) for c in copies], per_graph=2)[0] / len(copies)

    def gemv(self) -> dict:
        out: dict[str, Any] = {}
        for name in [c for c in FUSED if c in self.ok_codecs]:
            mod = self.kernel(name)
            if mod is None or not hasattr(mod, "prepare"):
                continue
            rows = []
            for shape in self.shapes():
                if self.over():
                    rows.append({"shape": list(shape), "error": "skipped: the section's time ran out"})
                    continue
                try:
                    enc, spec, shared = self.payload(name, shape)
                    w = mod.prepare(enc, spec)
                    dense = self.decode_fast(name, enc, spec, shared, torch.bfloat16)
                    ws, ds = self.copies(mod, enc, spec, w, dense)
                    for m in (1, 8, 16):
                        x = torch.randn(m, shape[1], device=self.dev, dtype=torch.bfloat16)
                        t_fused = self.per_copy_ms(lambda wi: mod.matmul(x, wi), ws)
                        t_dense = self.per_copy_ms(lambda di: F.linear(x, di), ds)
                        rows.append({"shape": list(shape), "rows": m, "fused_us": 1e3 * t_fused,
                                     "bf16_linear_us": 1e3 * t_dense, "speedup": t_dense / t_fused,
                                     "copies_rotated": [len(ws), len(ds)],
                                     "fused_GB_per_s": int(w.nbytes) / t_fused / 1e6,
                                     "bf16_GB_per_s": dense.numel() * 2 / t_dense / 1e6,
                                     "weight_bytes_ratio": dense.numel() * 2 / int(w.nbytes)})
                except Exception as exc:  # noqa: BLE001
                    rows.append({"shape": list(shape), "error": f"{type(exc).__name__}: {exc}"[:500]})
            out[name] = rows
        return out

    # ---- 4b. split sweep -------------------------------------------------------------------------
    def sweep(self) -> dict:
        """Batch-1 fused GEMV on the large shape for several split-K program counts (each kernel's
        ``matmul(..., programs=N)``; its default for one row is the module's ``_TARGET_PROGRAMS_GEMV``),
        against bf16 ``F.linear`` timed in the same way: which count the module should default to.
        Each count's output is checked against ``F.linear`` over the decoded weight first."""
        out: dict[str, Any] = {}
        shape = (64, 256) if self.dry else BIG
        for name in [c for c in FUSED if c in self.args.sweep.split(",")]:
            mod = self.kernel(name)
            rows: list[dict] = []
            out[name] = {"default": mod._TARGET_PROGRAMS_GEMV, "rows": rows}
            try:
                enc, spec, shared = self.payload(name, shape)
                dense = self.decode_fast(name, enc, spec, shared, torch.bfloat16)
                w = mod.prepare(enc, spec)
                ws, ds = self.copies(mod, enc, spec, w, dense)
                x = torch.randn(1, shape[1], device=self.dev, dtype=torch.bfloat16)
                yr = F.linear(x.float(), dense.float())
                t_dense = self.per_copy_ms(lambda di: F.linear(x, di), ds)
                out[name]["bf16_linear_us"] = 1e3 * t_dense
                for tp in (132, 264, 528, 1056, 2112, 4224):
                    if self.over():
                        break
                    try:
                        y = mod.matmul(x, w, programs=tp).float()
                        err = float((y - yr).norm() / yr.norm().clamp_min(1e-12))
                        t_f = self.per_copy_ms(lambda wi, tp=tp: mod.matmul(x, wi, programs=tp), ws)
                        rows.append({"programs": tp, "rel_err": err, "ok": err <= 2e-2, "fused_us": 1e3 * t_f,
                                     "speedup_vs_bf16": t_dense / t_f})
                    except Exception as exc:  # noqa: BLE001
                        rows.append({"programs": tp, "error": f"{type(exc).__name__}: {exc}"[:300]})
                    print(f"  {name} programs={tp}: {_short_sweep(rows[-1])}", flush=True)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                out[name]["error"] = f"{type(exc).__name__}: {exc}"[:1000]
            self.save()
        return out

    # ---- 5. end to end --------------------------------------------------------------------------
    def e2e(self) -> dict:
        from transformers import LlamaConfig, LlamaForCausalLM

        out: dict[str, Any] = {}
        self.result["sections"]["e2e"] = {"partial": out}  # saved after every configuration
        cfg = LlamaConfig(**(TINY_CONFIG if self.dry else SMOL_CONFIG))
        torch.manual_seed(0)
        work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
        src = work / "src"
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.05)
        model.save_pretrained(src)
        out["model"] = {"params": sum(p.numel() for p in model.parameters()), "layers": cfg.num_hidden_layers,
                        "weights": "random normal(0, 0.05), seed 0: speed does not depend on the values"}
        t = time.perf_counter()
        from thawed.runtime.compress.pipeline import compress
        from thawed.runtime.compress.plan import Plan, parse_codec_choice

        ckpts = {}
        for codec in self.args.e2e_codecs.split(","):
            spec = {"rtn": "rtn:bits=4,group_size=128", "hyperc": "hyperc", "cvxq": "cvxq",
                    "lossless": "lossless"}.get(codec, codec)
            dst = work / codec.replace(":", "_")
            try:
                compress(src, dst, Plan(parse_codec_choice(spec)), progress=False)
                ckpts[codec] = dst
            except Exception as exc:  # noqa: BLE001
                out.setdefault("compress_errors", {})[codec] = f"{type(exc).__name__}: {exc}"[:500]
        out["compress_seconds"] = time.perf_counter() - t
        steps = 8 if self.dry else self.args.steps
        dense = model.to(self.dev)
        prompt = torch.randint(3, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1)).tolist()[0]

        def record(key: str, fn: Callable[[], dict]) -> None:
            if self.elapsed() > self.args.deadline:
                out[key] = {"skipped": "deadline"}
                return
            try:
                out[key] = fn()
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                out[key] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
            print(f"  {key}: {_short(out[key])}", flush=True)
            self.save()

        modes = (("warm", dict(direct="off")), ("direct", dict(direct="on")),
                 ("stream25", dict(direct="off", cache_budget=-250)),
                 ("stream25_no_overlap", dict(direct="off", cache_budget=-250, stream_overlap=False)),
                 ("stream25_hooks", dict(direct="off", cache_budget=-250, ring="off")))
        runs = list(ckpts.items())
        if self.args.real:
            runs.append(("real", Path(self.args.real)))
            record("real_text", lambda: self.real_text(Path(self.args.real)))
        record("dense_eager_hf", lambda: self.hf_generate(dense, prompt, steps, compiled=False))
        for codec, path in runs:
            record(f"{codec}_check", lambda p=path: self.graph_check(p, prompt))
            for mode, conf in modes:
                if codec not in FUSED + ("real",) and mode == "direct":
                    continue
                if codec == "real" and mode in ("stream25_no_overlap", "stream25_hooks"):
                    continue
                record(f"{codec}_{mode}", lambda p=path, c=conf: self.lazy_steps(p, c, prompt, steps))
        record("dense_graphs", lambda: self.stepper_steps(dense, prompt, steps, graphs=True))
        record("dense_eager_stepper", lambda: self.stepper_steps(dense, prompt, steps, graphs=False))
        if not self.args.no_compile:
            record("dense_compiled_hf", lambda: self.hf_generate(dense, prompt, steps, compiled=True))
            record("dense_compiled_graphs", lambda: self.stepper_steps(dense, prompt, steps, graphs=True,
                                                                       compile=True))
        return out

    def hf_generate(self, model, prompt: list[int], steps: int, compiled: bool) -> dict:
        """transformers' own generate, greedy, batch 1 and 8: ms per new token (prefill excluded:
        time(steps + 1 tokens) - time(1 token), divided by steps)."""
        res: dict[str, Any] = {}
        kw: dict[str, Any] = dict(do_sample=False, pad_token_id=2, eos_token_id=None)
        gen_model = model
        if compiled:
            kw["cache_implementation"] = "static"
            t = time.perf_counter()
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
            res["compile_note"] = "torch.compile(mode='reduce-overhead') + static cache (HF's recipe)"
        for batch in (1, 8):
            ids = torch.tensor([prompt] * batch, device=self.dev)
            with torch.inference_mode():
                if compiled:
                    t = time.perf_counter()
                    gen_model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, **kw)
                    self.sync()
                    res[f"first_call_s_b{batch}"] = time.perf_counter() - t  # includes compiling
                one = self.wall(lambda: gen_model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw))
                many = self.wall(lambda: gen_model.generate(ids, max_new_tokens=steps + 1,
                                                            min_new_tokens=steps + 1, **kw))
            ms = (many - one) * 1e3 / steps
            res[f"ms_per_token_b{batch}"] = ms
            res[f"tok_per_s_b{batch}"] = batch * 1e3 / ms
        if compiled:
            model.forward = model.__class__.forward.__get__(model)
        return res

    def wall(self, fn: Callable[[], Any], reps: int = 3) -> float:
        times = []
        for _ in range(1 if self.dry else reps):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return min(times)

    def stepper_steps(self, model, prompt: list[int], steps: int, graphs: bool, compile: bool = False) -> dict:
        """ms per decode step through runtime/stepper.py at batch 1 and 8 (CUDA graphs on/off)."""
        from thawed.runtime.stepper import Stepper

        res: dict[str, Any] = {}
        for batch in (1, 8):
            st = Stepper(model, slots=batch, max_len=len(prompt) + steps + 8, capacity=len(prompt) + steps + 8,
                         graphs=graphs and self.dev.type == "cuda", compile=compile)
            ids = torch.tensor([prompt] * batch, device=self.dev)
            logits = st.forward(ids, 0, [0] * batch)
            tok = logits.argmax(-1)[:, None]
            pos = len(prompt)
            # first decode step outside the timing (binds resident weights, captures the graph)
            t = time.perf_counter()
            logits = st.forward(tok, 0, [pos] * batch)
            self.sync()
            res[f"first_step_s_b{batch}"] = time.perf_counter() - t
            tok = logits.argmax(-1)[:, None]
            pos += 1
            self.sync()
            t = time.perf_counter()
            for i in range(steps):
                logits = st.forward(tok, 0, [pos + i] * batch)
                tok = logits.argmax(-1)[:, None]  # stays on the device: no sync per step
            self.sync()
            ms = (time.perf_counter() - t) * 1e3 / steps
            res[f"ms_per_token_b{batch}"] = ms
            res[f"tok_per_s_b{batch}"] = batch * 1e3 / ms
            if st.graphs is not None:
                res[f"graph_captures_b{batch}"] = st.graphs.captures
                res[f"graph_disabled_b{batch}"] = st.graphs.disabled
        return res

    def lazy_steps(self, path: Path, conf: dict, prompt: list[int], steps: int) -> dict:
        from thawed.runtime.model import LazyModel, RuntimeConfig

        t = time.perf_counter()
        lm = LazyModel.load(path, RuntimeConfig(device=self.dev.type, **conf))
        load_s = time.perf_counter() - t
        try:
            res = self.stepper_steps(lm.model, prompt, steps, graphs=True)
            res.update(load_s=load_s, modes=lm.mode_summary() if hasattr(lm, "mode_summary") else None)
            ring = lm.ring
            if ring is not None:
                res["ring"] = {"slots": ring.slots, "slot_MiB": ring.slot_numel * 2 / 2**20,
                               "overlap": ring.overlap, "MiB": ring.nbytes / 2**20}
            if self.dev.type == "cuda":
                res["max_memory_allocated_MiB"] = torch.cuda.max_memory_allocated() / 2**20
        finally:
            lm.close()
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        return res

    def real_text(self, path: Path) -> dict:
        """The real SmolLM2 checkpoint: greedy text on this device (graphs + direct) and on its CPU."""
        from transformers import AutoTokenizer

        from thawed.runtime.generate import SamplingParams, generate_tokens
        from thawed.runtime.model import LazyModel, RuntimeConfig

        tok = AutoTokenizer.from_pretrained(path)
        ids = tok("The capital of France is")["input_ids"]
        params = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
        res: dict[str, Any] = {}
        for dev in ([self.dev.type, "cpu"] if self.dev.type == "cuda" else ["cpu"]):
            lm = LazyModel.load(path, RuntimeConfig(device=dev))
            try:
                toks = [s.token for s in generate_tokens(lm.model, ids, params)]
                res[dev] = {"text": tok.decode(toks), "tokens": toks, "modes": lm.mode_summary()}
            finally:
                lm.close()
        if "cuda" in res:
            a, b = res["cuda"]["tokens"], res["cpu"]["tokens"]
            res["same_prefix"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        return res

    def graph_check(self, path: Path, prompt: list[int]) -> dict:
        """Greedy tokens: CUDA-graphed stepper == eager stepper (same weights), for resident and
        direct; and direct vs resident agreement (different arithmetic: reported, not required)."""
        from thawed.runtime.model import LazyModel, RuntimeConfig
        from thawed.runtime.stepper import Stepper

        n = 8 if self.dry else 32
        res: dict[str, Any] = {}
        toks = {}
        for mode in ("off", "on"):
            lm = LazyModel.load(path, RuntimeConfig(device=self.dev.type, direct=mode))
            try:
                for graphs in (False, True):
                    st = Stepper(lm.model, slots=1, max_len=len(prompt) + n + 8, capacity=len(prompt) + n + 8,
                                 graphs=graphs and self.dev.type == "cuda")
                    ids = torch.tensor([prompt], device=self.dev)
                    out = []
                    logits = st.forward(ids, 0, [0])
                    for i in range(n):
                        t = int(logits[0].argmax())
                        out.append(t)
                        logits = st.forward(torch.tensor([[t]], device=self.dev), 0, [len(prompt) + i])
                    toks[(mode, graphs)] = out
                res[f"direct_{mode}_graphs_equal_eager"] = toks[(mode, True)] == toks[(mode, False)]
            finally:
                lm.close()
        a, b = toks[("off", False)], toks[("on", False)]
        res["direct_vs_resident_same_prefix"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        return res


def _short(d: Any) -> str:
    if isinstance(d, dict):
        keys = [k for k in d if k.startswith(("ms_per_token", "tok_per_s", "error", "skipped", "direct_"))]
        return ", ".join(f"{k}={d[k]:.3g}" if isinstance(d[k], float) else f"{k}={d[k]}" for k in keys)[:400]
    return str(d)[:400]


def _short_sweep(r: dict) -> str:
    if "error" in r:
        return "ERROR " + r["error"][:200]
    return f"{r['fused_us']:.1f} us, x{r['speedup_vs_bf16']:.3f} of bf16, rel err {r['rel_err']:.1e}"


def table(result: dict) -> str:
    lines = []
    s = result["sections"]
    cp = s.get("copy", {}).get("result", {})
    lines.append(f"copy: {cp.get('GB_per_s', float('nan')):.0f} GB/s ({cp.get('name', '')})")
    for name, r in (s.get("correct", {}).get("result") or {}).items():
        lines.append(f"correct {name}: {'ok' if r.get('ok') else 'FAILED ' + str(r.get('error', ''))[:200]}")
    for name, rows in (s.get("decode", {}).get("result") or {}).items():
        for r in rows:
            if "error" in r:
                lines.append(f"decode {name:8s} {r['shape']}: ERROR {r['error'][:150]}")
            else:
                ref = r.get("pytorch_decoder_ms")
                ref_s = f"torch {ref * 1e3:9.1f} us" if isinstance(ref, float) else "torch n/a"
                lines.append(f"decode {name:8s} {str(r['shape']):14s} {r['ms'] * 1e3:9.1f} us "
                             f"({r['ms_with_launch'] * 1e3:7.1f} launched, {ref_s}) {r['GB_per_s']:8.0f} GB/s "
                             f"{r['pct_of_copy']:5.1f}% of copy  {r['payload_bits_per_weight']:.2f} b/w")
    for name, rows in (s.get("gemv", {}).get("result") or {}).items():
        for r in rows:
            if "error" in r:
                lines.append(f"gemv {name} {r['shape']}: ERROR {r['error'][:150]}")
            else:
                lines.append(f"gemv {name:7s} {str(r['shape']):14s} m={r['rows']:2d} fused {r['fused_us']:8.1f} us "
                             f"bf16 {r['bf16_linear_us']:8.1f} us  x{r['speedup']:.2f}  mem /{r['weight_bytes_ratio']:.2f}")
    for name, sw in (s.get("sweep", {}).get("result") or {}).items():
        lines.append(f"sweep {name} (bf16 F.linear {sw.get('bf16_linear_us', float('nan')):.1f} us, "
                     f"default {sw.get('default')}): " + "; ".join(
                         f"{r['programs']}: {_short_sweep(r)}" for r in sw.get("rows", [])) + sw.get("error", ""))
    for key, r in (s.get("e2e", {}).get("result") or {}).items():
        lines.append(f"e2e {key}: {_short(r)}")
    for name, sec in s.items():
        if "error" in sec or "skipped" in sec:
            lines.append(f"section {name}: {sec.get('error') or sec.get('skipped')}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter: checks the script")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "out"), "gpu_check.json"))
    ap.add_argument("--deadline", type=float, default=320.0, help="seconds after which sections are skipped")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed per configuration")
    ap.add_argument("--sections", default="copy,correct,decode,gemv,e2e",
                    help="any of copy,correct,decode,gemv,sweep,e2e, run in the order given")
    ap.add_argument("--codecs", default=",".join(CASES), help="codecs the correct/decode/gemv sections take")
    ap.add_argument("--sweep", default=",".join(FUSED), help="fused codecs the sweep section takes")
    ap.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS",
                    help="a section's own time budget (default correct=70, decode=60, gemv=60, sweep=60)")
    ap.add_argument("--e2e-codecs", default="rtn", help="codecs compressed for the end-to-end section")
    ap.add_argument("--big-nwc", action="store_true", help="also time nwc on 4096x11008 (slow to encode)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd dense baseline")
    ap.add_argument("--real", help="a thawed checkpoint of the real SmolLM2 (e.g. out/rtn3, carried to the GPU)")
    args = ap.parse_args()
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    args.budgets = dict(SECTION_BUDGET)
    for item in args.budget:
        sec, _, secs = item.partition("=")
        try:
            args.budgets[sec] = float(secs)
        except ValueError:
            ap.error(f"--budget {item!r}: expected SECTION=SECONDS, e.g. correct=120")
    b = Bench(args)
    b.result["env"] = {"torch": torch.__version__, "python": sys.version.split()[0],
                       "triton": _version("triton"), "transformers": _version("transformers")}
    for name in args.sections.split(","):
        b.section(name, getattr(b, name))
    b.result["total_seconds"] = b.elapsed()
    b.save()
    print("\n" + table(b.result), flush=True)
    return 0


def _version(mod: str) -> str | None:
    try:
        return importlib.import_module(mod).__version__
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    raise SystemExit(main())
