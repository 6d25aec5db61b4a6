"""The compression pipeline: HF model directory in, thawed checkpoint directory out.

Tensors are read one at a time from the memory-mapped source and written to the payload file as
soon as they are encoded, so peak memory is about one tensor plus its encoding (never the model
twice). Roles (linear / embedding / lm_head / other) come from the architecture built with no
weights, so any decoder-only transformers model with ``nn.Linear`` projections works.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from thawed.codecs import Codec, EncodeContext, TensorSpec
from thawed.codecs.errors import ThawedError

from ..skeleton import build_skeleton, load_config, tensor_roles
from ..validate import mark_nonfinite
from .calib_data import DEFAULT_CALIB_TOKENS
from .plan import CodecChoice, Plan
from .source import SourceModel
from .writer import CheckpointWriter, check_output_path

__all__ = ["compress", "CompressReport"]

log = logging.getLogger(__name__)

PROGRESS_EVERY = 10.0  # seconds between progress log lines when stderr is not a terminal


class _Heartbeat:
    """Without a progress bar (stderr not a terminal: CI, ``nohup``, a pipe), log a line every
    ``every`` seconds from a daemon thread, so one slow tensor still shows signs of life."""

    def __init__(self, total: int, every: float | None = None, enabled: bool = True) -> None:
        import threading

        self.total, self.every, self.enabled = total, PROGRESS_EVERY if every is None else every, enabled
        self.done, self.current = 0, ""
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="thawed-compress-progress", daemon=True)

    def __enter__(self) -> "_Heartbeat":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def update(self, done: int, current: str) -> None:
        self.done, self.current = done, current

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            log.info("compress: %d/%d tensors done, %.0f s so far; encoding %s", self.done, self.total,
                     time.monotonic() - self.t0, self.current)


@dataclass(frozen=True)
class CompressReport:
    path: Path
    tensors: int
    source_bytes: int
    payload_bytes: int
    seconds: float
    codecs: dict[str, int]


def compress(src: str | Path, out: str | Path, plan: Plan, *, progress: bool | None = None,
             seed: int = 0, target_bpw: float | None = None, calib_tokens: int | None = None,
             sensitivities: dict | None = None, input_means: dict | None = None,
             calib=None) -> CompressReport:
    """``target_bpw`` runs the cvxq planning step (calibration + bit allocation, see
    ``runtime/compress/allocate.py``) before the tensor loop; it needs cvxq in the plan. ``sensitivities``
    (name -> per-weight squared gradients, from ``runtime/compress/calibrate.py``) and ``input_means`` (linear
    weight name -> calibration E[x], for cvxq's bias correction) reuse a calibration. ``calib``: the
    calibration text (``runtime/compress/calib_data.CalibSpec``; default: text the model generates itself,
    seeded with ``seed``), produced once and shared by every calibrated stage. An nwc encoder with
    ``target_bpw`` and ``alloc=global`` has its tensors' rates planned together first
    (``runtime/compress/nwc_plan.py``: Fisher sensitivities, one Lagrange multiplier, the whole
    file at the target); ``sensitivities`` reuses a calibration there too. ``calib_tokens``: tokens of
    that text (default ``DEFAULT_CALIB_TOKENS``, 32,768)."""
    t0 = time.perf_counter()
    calib_tokens = DEFAULT_CALIB_TOKENS if calib_tokens is None else calib_tokens
    src, out = Path(src), Path(out)
    check_output_path(out)  # before any work: new or empty, no leftover of an interrupted run
    config = load_config(src)
    roles = tensor_roles(build_skeleton(config))
    encoders: dict[CodecChoice, Codec] = {}
    counts: dict[str, int] = {}
    source_bytes = 0
    if progress is None:
        progress = sys.stderr.isatty()
    from tqdm import tqdm

    with SourceModel(src) as source:
        names = source.names()
        settings = {"plan": plan.as_dict(), "seed": seed}
        depths: dict = {}
        token_freq = None  # calibration token counts for codecs that weight embedding rows by use
        means: dict = {}
        for choice in {plan.default, *(c for _, c in plan.overrides)}:
            encoders.setdefault(choice, choice.build())
        needs_grams = any(getattr(c, "needs_input_grams", False) for c in encoders.values())
        nwc_global = any(getattr(c, "plans_globally", False) for c in encoders.values())
        if nwc_global and target_bpw is not None:
            raise ThawedError("--target-bpw plans cvxq depths and nwc:target_bpw (alloc=global) plans nwc rates; "
                              "one file has one budget: use one of them, or give nwc alloc=tensor")
        needs_calib = needs_grams or nwc_global or (target_bpw is not None and (sensitivities is None or input_means is None))
        if needs_calib:
            from .calib_data import CalibData, CalibSpec, resolve_calibration  # offline only

            if not isinstance(calib, CalibData):
                calib = resolve_calibration(src, calib_tokens, calib if calib is not None else CalibSpec(seed=seed))
            settings["calibration"] = calib.record
        if target_bpw is not None:
            if plan.default.name != "cvxq" and not any(c.name == "cvxq" for _, c in plan.overrides):
                raise ThawedError(f"--target-bpw plans cvxq bit depths; use --codec cvxq (got {plan.default})")
            from .allocate import plan_cvxq  # planning only: the runtime never imports calibration

            cplan = plan_cvxq(src, names, source.shape_dtype, source.get, roles, plan.choose, target_bpw,
                              calib_tokens=calib_tokens, seed=seed, sensitivities=sensitivities,
                              input_means=input_means, calib=calib)
            depths = cplan.depths
            means = cplan.input_means
            settings["cvxq_plan"] = cplan.record
        grams: dict = {}
        if needs_grams:
            from .input_stats import input_grams  # calibration: the runtime never imports it

            grams = input_grams(src, tokens=calib_tokens, calib=calib)
            settings["input_stats"] = {"tokens": calib.tokens, "source": calib.record.get("source")}
        nplan = None
        if nwc_global:
            from .nwc_plan import plan_nwc  # planning only: the runtime never imports it

            fisher = any(getattr(c, "plans_globally", False) and c.sens == "fisher" for c in encoders.values())
            if sensitivities is None and fisher:
                from .calibrate import weight_sensitivities

                cal = weight_sensitivities(src, calib_tokens, seed=seed, calib=calib)
                sensitivities = cal.sens
                settings["nwc_sensitivities"] = {"tokens": cal.tokens, "windows": cal.windows,
                                                 "seconds": round(cal.seconds, 1)}

            def build(choice: CodecChoice) -> Codec:
                return encoders.get(choice) or encoders.setdefault(choice, choice.build())

            def importance(name: str):
                shape, dtype = source.shape_dtype(name)
                codec = build(plan.choose(name, roles.get(name, "other"), dtype, len(shape)))
                gram = grams.get(name) if getattr(codec, "needs_input_grams", False) else None
                return None if gram is None else torch.diagonal(gram).clone()

            nplan = plan_nwc(src, names, source.shape_dtype, source.get, roles, plan.choose, build, sensitivities,
                             importance, settings, seed=seed, calib=calib)
            if nplan is not None:
                settings["nwc_plan"] = nplan.record
        with CheckpointWriter(out, source=str(src), settings=settings, source_dir=src) as writer, \
                _Heartbeat(len(names), enabled=not progress) as beat:
            for i, name in enumerate(tqdm(names, desc="compress", unit="tensor", disable=not progress)):
                beat.update(i, name)
                shape, dtype = source.shape_dtype(name)
                role = roles.get(name, "other")
                choice = plan.choose(name, role, dtype, len(shape))
                codec = encoders.get(choice)
                if codec is None:
                    codec = encoders[choice] = choice.build()
                weight = source.get(name)
                source_bytes += weight.numel() * weight.element_size()
                spec = TensorSpec(name=name, shape=tuple(shape), dtype=dtype, role=role)
                try:
                    extras = {"cvxq_depth": depths[name]} if name in depths else {}
                    if nplan is not None and name in nplan:
                        extras["nwc_rate"] = nplan.rate(name)
                    if role in ("embedding", "lm_head") and getattr(codec, "wants_token_freq", False):
                        if token_freq is None:  # once per model, only when such a codec is planned
                            from .token_freq import token_frequencies

                            token_freq = token_frequencies(src, int(shape[0]))
                        extras["token_freq"] = token_freq
                    if name in means:
                        extras["cvxq_input_mean"] = means[name]
                    gram = grams.get(name) if getattr(codec, "needs_input_grams", False) else None
                    if gram is not None:
                        extras["input_gram"] = gram
                    enc = codec.encode(weight, spec, EncodeContext(
                        name=name, role=role, seed=seed, extras=extras,
                        importance=None if gram is None else torch.diagonal(gram).clone()))
                except ThawedError as exc:
                    raise ThawedError(f"tensor {name!r} ({choice}): {exc}") from exc
                if "nwc_rate" in extras:  # the plan re-allocates the rest with this tensor's real size
                    nplan.encoded(name, 8 * enc.nbytes, torch.unique(enc.fields["levels"]).tolist())
                enc = mark_nonfinite(codec.name, weight, enc)  # a lossless copy of NaN/Inf says so
                writer.add(spec, codec.name, codec.version, enc)
                counts[codec.name] = counts.get(codec.name, 0) + 1
                del weight, enc
            for codec in encoders.values():
                shared = codec.shared_tensors()
                if shared:
                    writer.add_shared(codec.name, shared)
            path = writer.finish()
    payload = path.stat().st_size if path.is_file() else 0
    report = CompressReport(path=out, tensors=len(names), source_bytes=source_bytes,
                            payload_bytes=payload, seconds=time.perf_counter() - t0, codecs=counts)
    log.info("compressed %d tensors in %.1fs: %s", report.tensors, report.seconds, counts)
    return report
