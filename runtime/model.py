"""The lazy model: a thawed checkpoint opened as a transformers model whose weights decode on use.

``LazyModel.load(path, RuntimeConfig(...))`` validates the checkpoint (no payload read), builds
the architecture with no weights, loads the small ``raw`` tensors (norms, biases), and attaches
every compressed weight to the decoded-weight cache. The first forward through a layer decodes
its weights (on the GPU when the model runs there); the prefetcher decodes the next layers ahead.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from thawed.codecs.threads import one_thread, set_thread_count
from thawed.codecs import Encoded, get_codec
from thawed.codecs.errors import ThawedError
from thawed.codecs.kernels import kernels_available

from .cache import WeightCache
from .checkpoint import Checkpoint
from .direct import DirectLinear, direct_unsupported_reason
from .early import EarlyDecode
from .direct_gpu import KernelLinear, kernel_decoder, kernel_unsupported_reason
from .ring import ALIGN, LayerRing
from .lazy import ResidentWeightHandle, attach_lazy_weight, attach_resident_weight
from .memory import return_large_frees_to_os
from .prefetch import Prefetcher, layer_index
from .rowwise import attach_rowwise_embedding
from .skeleton import build_model, load_config, tied_sources
from .validate import check_config, check_entries_used, check_finite

__all__ = ["RuntimeConfig", "LazyModel", "resolve_device", "resolve_dtype", "parse_budget"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeConfig:
    """How to run a checkpoint. ``cache_budget``: bytes, ``None``/"auto" = hold every layer."""

    device: str = "auto"  # auto | cuda | cuda:N | cpu
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16
    cache_budget: int | None = None
    prefetch_layers: int = 1
    # Embeddings whose codec can decode single rows (see) rebuild only the ids of each forward
    # instead of the whole table (runtime/rowwise.py). "auto": only when no other module needs the
    # whole table (an untied embedding); a tied lm_head decodes it through the cache anyway, and
    # then per-token decode saves nothing (docs/SEE.md measures it). "on" | "off": always | never.
    rowwise_embedding: str = "auto"
    # Linear weights whose codec has a fused decode-matmul run from their packed codes ("direct"
    # mode) instead of being decoded: on the CPU rtn with <= 4 bits (torch's int4 kernel,
    # runtime/direct.py), on CUDA rtn, cvxq and hyperc (Triton kernels, runtime/direct_gpu.py).
    # "auto": on wherever those run (CPU: measured faster, benchmarks/speed.py; CUDA: when Triton
    # imports, benchmarks/gpu_check.sh). "off": decode every weight.
    direct: str = "auto"
    # torch.compile the one-token decode step (runtime/stepper.py). Off by default: a cold compile
    # pauses the second token ~45 s on 2 cores (7.6 s with inductor's cache); then 1.5-1.6x
    # llama.cpp (docs/SPEED.md).
    compile: bool = False
    # Under a budget, stream decoder layers through a ring of slots that their weights view
    # (runtime/ring.py: hook-free, decoded by the Triton kernels, capturable in a CUDA graph) with
    # the other weights resident, instead of the per-weight hooks. "auto": on CUDA when Triton
    # imports; "on": anywhere (the CPU decodes with the PyTorch decoders); "off": hooks only.
    ring: str = "auto"
    # With two or more ring slots, decode layer i+1 on a side CUDA stream while layer i computes.
    stream_overlap: bool = True
    # The Triton kernels on CUDA (codecs/kernels: decoders, fused matmuls, the ring's decodes).
    # "off": the codecs' PyTorch decoders only -- the escape hatch while the kernels have not yet
    # run on a GPU of this project (docs/GPU.md). No effect on the CPU.
    kernels: str = "auto"
    # On the CPU with an unbounded cache, decode (or repack for direct mode) on a worker thread
    # from the moment the checkpoint is open, while transformers imports and the model is built
    # (runtime/early.py). Off: every weight decodes when the load or the first forward needs it.
    early_decode: bool = True
    # How the model is built (runtime/skeleton.py SKELETONS): "transformers" (default: every entry
    # point calls its forward), "native" or "auto" (runtime/native.py: no transformers import, the
    # fast decode path only; ``thawed generate`` asks for "auto").
    skeleton: str = "transformers"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ThawedError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ThawedError("--device cuda was asked for but CUDA is not available here; use --device cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise ThawedError(f"--device {name!r} is not supported; use auto, cpu or cuda")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ThawedError(f"--dtype {name!r} is not supported; use auto, float32, bfloat16 or float16") from None


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30}


def parse_budget(text: str | int | None) -> int | None:
    """``auto``/``none`` -> None (hold everything); ``123``, ``512MiB``, ``1.5G`` -> bytes;
    ``25%`` -> returned as a negative permille marker resolved by ``LazyModel`` against the
    decoded size (``-250`` means 25 %)."""
    if text is None or isinstance(text, int):
        return text
    s = str(text).strip().lower().replace(" ", "")
    if s in ("auto", "none", "all", ""):
        return None
    if s.endswith("%"):
        try:
            pct = float(s[:-1])
        except ValueError:
            pct = -1
        if not 0 < pct <= 100:
            raise ThawedError(f"--cache-budget {text!r}: a percentage must be in (0, 100]")
        return -max(1, round(pct * 10))
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ThawedError(
            f"--cache-budget {text!r} is not a size; use bytes (123456), units (512MiB, 2G), a share "
            "of the decoded model (25%) or auto"
        ) from None
    if value < 0:
        raise ThawedError(f"--cache-budget {text!r} must not be negative")
    return int(value)


def attach_output_biases(ckpt: Checkpoint, lazy_modules: list[tuple[nn.Module, str, str]],
                         device: torch.device, dtype: torch.dtype) -> int:
    """Add each compressed linear weight's stored output correction (``Codec.decode_output_bias``,
    e.g. cvxq's bias correction) to its layer's bias, creating the bias where the layer has none.
    Read once on load (a few KB per layer); returns the number of layers corrected."""
    done = 0
    for mod, pname, key in lazy_modules:
        entry = ckpt.index[key]
        codec = get_codec(entry.codec)
        if pname != "weight" or not isinstance(mod, nn.Linear) or not codec.has_output_bias(entry.params):
            continue
        corr = codec.decode_output_bias(ckpt.encoded(key), entry.spec, device, dtype)
        if corr is None:
            continue
        if tuple(corr.shape) != (mod.out_features,):
            raise ThawedError(
                f"checkpoint tensor {key!r}: its bias correction has shape {list(corr.shape)}, the layer has "
                f"{mod.out_features} outputs; the file is damaged or was not written by thawed"
            )
        bias = corr if mod.bias is None else mod.bias.detach().to(device, dtype) + corr
        mod.bias = nn.Parameter(bias, requires_grad=False)
        done += 1
    return done


def _count(modes: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in modes.values():
        out[m] = out.get(m, 0) + 1
    return out


def plan_modes(weights: list[tuple[str, nn.Module, str, str]], index, config: RuntimeConfig,
               device: torch.device, elem: int, budget: int | None) -> list[str]:
    """The execution mode of each compressed parameter ``(module name, module, param, key)``:

    * ``direct``: an ``nn.Linear`` weight whose codec has a fused decode-matmul (``config.direct``);
    * ``rowwise``: an embedding whose codec decodes single rows, when no other module needs the
      whole table (its tied head runs direct, or it is untied), or always with ``rowwise_embedding=on``;
    * ``resident``: decoded once and bound, when every weight left for the cache fits its budget;
    * ``streamed``: decoded into the budgeted cache on every use.

    ``elem``: bytes per decoded weight; ``budget``: the cache budget in bytes (None: unbounded).
    """
    if config.direct not in ("auto", "on", "off"):
        raise ThawedError(f"--direct {config.direct!r} is not one of auto, on, off")
    if config.rowwise_embedding not in ("auto", "on", "off"):
        raise ThawedError(f"--rowwise-embedding {config.rowwise_embedding!r} is not one of auto, on, off")
    if config.kernels not in ("auto", "off"):
        raise ThawedError(f"--kernels {config.kernels!r} is not one of auto, off")
    use_direct = config.direct in ("on", "auto") and not (device.type == "cuda" and config.kernels == "off")
    plan: list[str] = []
    for mname, mod, pname, key in weights:
        entry = index[key]
        if (use_direct and isinstance(mod, nn.Linear) and pname == "weight"
                and direct_reason(entry.codec, entry.params, tuple(entry.shape), device) is None):
            plan.append("direct")
        else:
            plan.append("")
    for i, (mname, mod, pname, key) in enumerate(weights):
        if plan[i] or not (isinstance(mod, nn.Embedding) and pname == "weight"
                           and hasattr(get_codec(index[key].codec), "decode_rows")):
            continue
        others = any(k == key and j != i and plan[j] != "direct" for j, (_, _, _, k) in enumerate(weights))
        if config.rowwise_embedding == "on" or (config.rowwise_embedding == "auto" and not others):
            plan[i] = "rowwise"
    need = sum(index[k].spec.numel for k in dict.fromkeys(k for i, (_, _, _, k) in enumerate(weights) if not plan[i]))
    fits = budget is None or need * elem <= budget
    if not fits and use_ring(config, device):
        ring = ring_plan([(i, weights[i][0], weights[i][3]) for i in range(len(weights)) if not plan[i]], index, elem)
        if ring is not None and ring[1] + ring[2] <= budget:
            for i in range(len(weights)):
                if not plan[i]:
                    plan[i] = "ring" if i in ring[0] else "resident"
    return [p or ("resident" if fits else "streamed") for p in plan]


def use_ring(config: RuntimeConfig, device: torch.device) -> bool:
    if config.ring not in ("auto", "on", "off"):
        raise ThawedError(f"--ring {config.ring!r} is not one of auto, on, off")
    if device.type == "cuda" and config.kernels == "off":
        return config.ring == "on"
    return config.ring == "on" or (config.ring == "auto" and device.type == "cuda" and kernels_available(device))


def ring_plan(candidates: list[tuple[int, str, str]], index, elem: int) -> tuple[set[int], int, int] | None:
    """Which of ``candidates`` (weight number, module name, key) a ring streams, the bytes of one
    ring slot, and the bytes of the rest (resident); None when no ring applies (no layer weights,
    or a key shared between weights)."""
    layer_keys = [k for _, mname, k in candidates if layer_index(mname) is not None]
    if not layer_keys or len(set(layer_keys)) != len(layer_keys):
        return None  # a key shared by two layer weights would need two places
    per_layer: dict[int, int] = {}
    ring: set[int] = set()
    rest: dict[str, int] = {}
    for i, mname, key in candidates:
        layer = layer_index(mname)
        numel = index[key].spec.numel
        if layer is None:
            rest[key] = numel * elem  # tied weights (embedding and head) count once
        elif key in rest:
            return None
        else:
            ring.add(i)
            per_layer[layer] = per_layer.get(layer, 0) + -(-numel // ALIGN) * ALIGN
    if set(layer_keys) & set(rest):
        return None
    return ring, max(per_layer.values()) * elem, sum(rest.values())


def direct_reason(codec: str, params, shape: tuple[int, ...], device: torch.device) -> str | None:
    """None when a weight can run direct on ``device`` (CUDA: a Triton kernel; CPU: torch's int4 kernel)."""
    if device.type == "cuda":
        return kernel_unsupported_reason(codec, shape, device)
    return direct_unsupported_reason(codec, params, shape, device)


def decode_with(codec_name: str, enc, spec, shared, device: torch.device, dtype: torch.dtype,
                kernels: bool) -> torch.Tensor:
    """``Codec.decode``, with its Triton kernel turned off on CUDA when ``kernels`` is False."""
    codec = get_codec(codec_name)
    if not kernels and device.type == "cuda" and "fast" in inspect.signature(codec.decode).parameters:
        return codec.decode(enc, spec, shared, device, dtype, fast=False)
    return codec.decode(enc, spec, shared, device, dtype)


def _build_ring(weights, plan, index, config: RuntimeConfig, device: torch.device, dtype: torch.dtype,
                elem: int, budget: int | None, payload, shared_cache, ckpt) -> LayerRing:
    """The ring of ``plan``'s "ring" weights: as many slots as the budget leaves after the
    resident weights (at least one)."""
    layers: dict[int, list] = {}
    for i, (mname, mod, pname, key) in enumerate(weights):
        if plan[i] == "ring":
            layers.setdefault(layer_index(mname), []).append((mod, pname, key, tuple(index[key].shape)))
    resident = sum(index[k].spec.numel for k in dict.fromkeys(
        k for i, (_, _, _, k) in enumerate(weights) if plan[i] == "resident")) * elem
    slot = max(sum(-(-_numel(s) // ALIGN) * ALIGN for _, _, _, s in ws) for ws in layers.values()) * elem
    slots = max(1, ((budget or 0) - resident) // slot)
    validated: set[str] = set()

    def decode_into(key: str, out: torch.Tensor) -> None:
        entry = index[key]
        enc = payload(key)
        shared = shared_cache[entry.codec]
        fast = kernel_decoder(entry.codec, device) if config.kernels != "off" else None
        if key in validated and fast is not None:  # checked once below; from then on sync-free
            fast(enc, entry.spec, shared, dtype, out)
            return
        w = decode_with(entry.codec, enc, entry.spec, shared, device, dtype, config.kernels != "off")
        check_finite(ckpt.payload_path, entry, w)
        out.copy_(w.view(out.shape))
        validated.add(key)

    return LayerRing(layers, decode_into, slots, device, dtype, overlap=config.stream_overlap)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class LazyModel:
    """A causal LM over a thawed checkpoint; ``.model`` is an ordinary transformers module."""

    def __init__(self, checkpoint: Checkpoint, model: nn.Module, cache: WeightCache,
                 prefetcher: Prefetcher, device: torch.device, dtype: torch.dtype,
                 decoded_nbytes: int, lazy_keys: list[str], load_seconds: float, *,
                 modes: dict[str, str] | None = None, residents: list | None = None,
                 direct_nbytes: int = 0, early: EarlyDecode | None = None) -> None:
        self.checkpoint = checkpoint
        self._early = early  # decodes still under way from the load (runtime/early.py)
        self.model = model
        self.cache = cache
        self.prefetcher = prefetcher
        self.device = device
        self.dtype = dtype
        self.decoded_nbytes = decoded_nbytes
        self.lazy_keys = lazy_keys
        self.load_seconds = load_seconds
        self.config = model.config
        self.modes = modes or {}  # parameter name -> direct | resident | streamed | rowwise
        self._residents = residents or []
        self.direct_nbytes = direct_nbytes  # memory of the weights that run compressed

    def mode_summary(self) -> dict[str, object]:
        """How many weights run in each execution mode, and the memory they hold."""
        stats = self.cache.stats()
        return {"modes": _count(self.modes), "direct_bytes": self.direct_nbytes,
                "decoded_bytes_in_cache": stats.bytes_used, "cache_budget": stats.budget_bytes}

    @classmethod
    def load(cls, path: str | Path, config: RuntimeConfig = RuntimeConfig()) -> "LazyModel":
        t0 = time.perf_counter()
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        ckpt = Checkpoint.open(path)
        early = None
        try:
            if config.early_decode and config.cache_budget is None:
                early = EarlyDecode.start(ckpt, device, dtype, config.direct in ("auto", "on"))
            return cls._build(ckpt, config, device, dtype, t0, early)
        except BaseException:
            if early is not None:
                early.close()  # before the mapping goes: the worker may be reading it
            ckpt.close()
            raise

    @classmethod
    def _build(cls, ckpt: Checkpoint, config: RuntimeConfig, device: torch.device,
               dtype: torch.dtype, t0: float, early: EarlyDecode | None = None) -> "LazyModel":
        hf_config = load_config(ckpt.config_dir, config.skeleton)
        check_config(hf_config, ckpt.index, ckpt.config_dir)
        model = build_model(hf_config, dtype)
        tied = tied_sources(model)
        index = ckpt.index

        # Which checkpoint tensor backs each parameter (tied parameters share their source's key).
        param_key: dict[str, str] = {}
        for name, _ in model.named_parameters(remove_duplicate=False):
            if name in index:
                param_key[name] = name
            elif name in tied and tied[name] in index:
                param_key[name] = tied[name]
            else:
                raise ThawedError(
                    f"the checkpoint {ckpt.path} has no tensor for parameter {name!r} of "
                    f"{type(model).__name__}; it was compressed from a different model or is incomplete"
                )

        check_entries_used(ckpt.payload_path, index, param_key.values())

        payload_cache: dict[str, Encoded] = {}
        payload_lock = threading.Lock()
        shared_cache: dict[str, dict[str, torch.Tensor]] = {}

        def payload(key: str) -> Encoded:
            # Payloads move to the decode device once (they are small) and stay there.
            with payload_lock:
                enc = payload_cache.get(key)
                if enc is None:
                    enc = ckpt.encoded(key)
                    if device.type != "cpu":
                        enc = enc.to(device)
                        payload_cache[key] = enc
                codec = index[key].codec
                if codec not in shared_cache:
                    shared_cache[codec] = {k: v.to(device) for k, v in ckpt.shared(codec).items()}
                return enc

        def decode(key: str):
            entry = index[key]
            if early is not None:
                weight = early.take_decoded(key)
                if weight is not None:
                    return weight, entry.codec, None
            enc = payload(key)
            # CPU: one torch thread per decoding thread (codecs/threads.py); the early decoder or
            # the prefetcher decodes beside this one
            with one_thread() if device.type == "cpu" else contextlib.nullcontext():
                weight = decode_with(entry.codec, enc, entry.spec, shared_cache[entry.codec], device, dtype,
                                     config.kernels != "off")
            check_finite(ckpt.payload_path, entry, weight)
            ready = None
            if device.type == "cuda" and torch.cuda.current_stream(device) != torch.cuda.default_stream(device):
                ready = torch.cuda.Event()
                ready.record()
            return weight, entry.codec, ready

        cache_budget = config.cache_budget
        elem = torch.empty((), dtype=dtype).element_size()
        weights: list[tuple[str, nn.Module, str, str]] = []  # (module name, module, param, key)
        for mname, mod in model.named_modules():
            for pname, param in list(mod.named_parameters(recurse=False)):
                full = f"{mname}.{pname}" if mname else pname
                key = param_key[full]
                entry = index[key]
                if tuple(entry.shape) != tuple(param.shape):
                    raise ThawedError(
                        f"checkpoint tensor {key!r} has shape {list(entry.shape)} but {full!r} of the "
                        f"model needs {list(param.shape)}; the config.json does not match the weights"
                    )
                if entry.codec == "raw":
                    value = ckpt.decode(key, device=device, dtype=dtype if param.is_floating_point() else param.dtype)
                    setattr(mod, pname, nn.Parameter(value, requires_grad=False))
                else:
                    weights.append((mname, mod, pname, key))

        # Decoded bytes of the whole model: what a "25%" budget is a share of.
        decoded_nbytes = sum(index[k].spec.numel for k in dict.fromkeys(k for _, _, _, k in weights)) * elem
        if cache_budget is not None and cache_budget < 0:
            cache_budget = decoded_nbytes * (-cache_budget) // 1000
        plan = plan_modes(weights, index, config, device, elem, cache_budget)
        modes = {f"{mname}.{pname}" if mname else pname: plan[i] for i, (mname, _, pname, _) in enumerate(weights)}
        lazy_modules = [(mod, pname, key) for i, (_, mod, pname, key) in enumerate(weights)
                        if plan[i] in ("resident", "streamed", "ring")]
        attach_output_biases(ckpt, lazy_modules, device, dtype)

        direct_nbytes = 0
        if "direct" in plan:
            # Repacking makes large temporaries (int32 codes of the head: 4 bytes a weight); with
            # glibc's adaptive mmap threshold they would stay in the heap as fragmentation
            # (measured: +0.5 GiB peak RSS on SmolLM2). Large blocks from mmap go back when freed.
            return_large_frees_to_os()
        def repack(i: int) -> nn.Module:
            mname, mod, pname, key = weights[i]
            enc, entry = ckpt.encoded(key), index[key]
            if device.type == "cuda":
                codec = get_codec(entry.codec)
                bias = None if mod.bias is None else mod.bias.detach().to(device, dtype)
                gpu_enc = enc.to(device)
                extra = codec.decode_output_bias(gpu_enc, entry.spec, device, dtype)  # cvxq's bias correction
                if extra is not None:
                    bias = extra if bias is None else bias + extra
                try:
                    return KernelLinear.from_payload(entry.codec, gpu_enc, entry.spec, bias)
                except (NotImplementedError, ValueError) as exc:  # a layout the kernel does not take
                    log.warning("%s runs decoded, not direct: %s", key, exc)
                    w = codec.decode(gpu_enc, entry.spec, shared_cache.get(entry.codec) or
                                     {k: v.to(device) for k, v in ckpt.shared(entry.codec).items()}, device, dtype)
                    check_finite(ckpt.payload_path, entry, w)
                    lin = nn.Linear(entry.shape[1], entry.shape[0], bias=bias is not None, device="meta")
                    lin.weight = nn.Parameter(w, requires_grad=False)
                    if bias is not None:
                        lin.bias = nn.Parameter(bias, requires_grad=False)
                    return lin
            lin = DirectLinear.from_rtn(enc.fields["codes"], enc.fields["scale"], enc.fields["offset"], enc.params,
                                        tuple(entry.shape), None if mod.bias is None else mod.bias.detach(), device,
                                        packed=early.take_packed(key) if early is not None else None)
            check_finite(ckpt.payload_path, entry, lin.scale_zero)  # codes are integers: scales carry any NaN
            return lin

        todo = [i for i, m in enumerate(plan) if m == "direct"]
        if early is not None:
            early.retain({weights[i][3] for i, m in enumerate(plan) if m == "resident"},
                         {weights[i][3] for i in todo})
        # torch ops release the GIL: repack on every intra-op thread (SmolLM2: 211 tensors, ~3 s alone)
        # (on CUDA one at a time: the kernels' repacks are GPU work already)
        workers = 1 if device.type == "cuda" else max(1, torch.get_num_threads())
        single = (set_thread_count, (1,)) if device.type == "cpu" else (None, ())  # codecs/threads.py
        with ThreadPoolExecutor(max_workers=workers, initializer=single[0], initargs=single[1]) as pool:
            for i, lin in zip(todo, pool.map(repack, todo)):
                mname = weights[i][0]
                parent, _, child = mname.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, lin)
                if isinstance(lin, (DirectLinear, KernelLinear)):
                    direct_nbytes += lin.nbytes
                else:
                    modes[f"{mname}.{weights[i][2]}"] = "resident"

        cache = WeightCache(decode, cache_budget, size_of=lambda key: index[key].spec.numel * elem)
        lazy_keys = [key for _, _, key in lazy_modules]
        streamed = [k for i, (_, _, _, k) in enumerate(weights) if plan[i] == "streamed"]
        prefetcher = Prefetcher(cache, streamed, config.prefetch_layers if streamed else 0, device)
        residents: list[ResidentWeightHandle] = []
        for i, (mname, mod, pname, key) in enumerate(weights):
            entry = index[key]
            if plan[i] == "resident":
                residents.append(attach_resident_weight(mod, pname, key, cache, tuple(entry.shape), dtype))
            elif plan[i] == "streamed":
                attach_lazy_weight(mod, pname, key, cache, tuple(entry.shape), dtype, prefetcher.on_access)
            elif plan[i] == "rowwise":

                def rows(ids: torch.Tensor, key: str = key, entry=entry) -> torch.Tensor:
                    enc = payload(key)
                    out = get_codec(entry.codec).decode_rows(enc, entry.spec, shared_cache[entry.codec], ids,
                                                             device, dtype)
                    if device.type == "cpu":  # on a GPU this would be a host sync per forward
                        check_finite(ckpt.payload_path, entry, out)
                    return out

                attach_rowwise_embedding(mod, rows, tuple(entry.shape), dtype)
        ring = None
        if "ring" in plan:
            ring = _build_ring(weights, plan, index, config, device, dtype, elem, cache_budget, payload,
                               shared_cache, ckpt)
            model._thawed_ring = ring  # the stepper calls ring.load(i) itself; see the hooks below
            for i_layer, layer in enumerate(model.model.layers):
                if i_layer in ring:
                    layer.register_forward_pre_hook(lambda mod, args, i=i_layer: ring.load(i))
                    layer._thawed_ring_hook = True  # runtime/cuda_graphs.hooks_left ignores this one
            log.info("streaming %d decoder layers through %d ring slots of %.1f MiB (overlap %s)",
                     len(ring.order), ring.slots, ring.slot_numel * elem / 2**20, ring.overlap)
        streamed_nbytes = sum(index[k].spec.numel for k in dict.fromkeys(streamed)) * elem
        if streamed:
            return_large_frees_to_os()
            log.warning(
                "cache budget %.1f MiB is below the %.1f MiB of decoded weights that need the cache: "
                "%d weights are decoded again on every forward (streaming decode), which is much slower",
                (cache_budget or 0) / 2**20, streamed_nbytes / 2**20, len(streamed),
            )
        log.info("execution modes: %s", ", ".join(f"{n} {m}" for m, n in sorted(_count(modes).items())))
        model.to(device)  # buffers (RoPE inv_freq) and raw parameters
        return cls(ckpt, model, cache, prefetcher, device, dtype, decoded_nbytes, lazy_keys,
                   time.perf_counter() - t0, modes=modes, residents=residents, direct_nbytes=direct_nbytes,
                   early=early)

    @property
    def ring(self) -> "LayerRing | None":
        return getattr(self.model, "_thawed_ring", None)

    def warm(self) -> None:
        """Decode every compressed weight now: resident weights are bound (hook-free from here on),
        streamed ones fill the cache up to its budget."""
        for handle in self._residents:
            handle.bind()
        for key in dict.fromkeys(self.lazy_keys):
            self.cache.prefetch(key)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def close(self) -> None:
        if self._early is not None:
            self._early.close()
        self.prefetcher.close()
        self.cache.clear()
        self.checkpoint.close()

    def __enter__(self) -> "LazyModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
