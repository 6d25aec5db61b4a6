"""``heal``: fine-tune a checkpoint's continuous fields against its dense source, block by block then
end to end, and write the healed checkpoint (same codecs, same bytes per tensor).

Interruptible: SIGINT or SIGTERM stops the run between two steps and saves its state in
``OUT.heal-state/``; ``resume=True`` continues from there with the same settings. Training on the
CPU is deterministic, so a run resumed after an interruption ends with the same fields, bit for
bit, as one that was never interrupted (step limits only; a time budget depends on the clock).
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from thawed.codecs.errors import ThawedError

from ...checkpoint import Checkpoint
from ..writer import check_output_path
from .blockwise import BlockStage
from .config import HealConfig
from .data import Batches
from .fields import TrainableCheckpoint
from .loop import Limits, train_unit
from .losses import kl_dense_student
from .output import write_healed
from .state import Progress, load_state, optimizer_tensors, save_state, state_dir
from .student import decoder_layers, load_teacher, make_student, run_model

__all__ = ["heal", "HealInterrupted", "HealResult"]

log = logging.getLogger("thawed.runtime.compress.heal")


class HealInterrupted(ThawedError):
    """The run stopped on a signal; its state is in ``state_dir`` (resume with ``--resume``)."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(f"healing interrupted; its state is saved in {state_dir}: run the same command with "
                         "--resume to continue")
        self.state_dir = state_dir


@dataclass(frozen=True)
class HealResult:
    path: Path
    record: dict
    fields: TrainableCheckpoint  # the healed fields (rounded to their stored dtypes), for tests


class _StopFlag:
    """SIGINT/SIGTERM set a flag the training loop checks between steps (main thread only)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._old: dict[int, object] = {}

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: leave now
        log.warning("heal: %s received; saving the state after this step", signal.Signals(signum).name)
        self.event.set()

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _calibration_ids(src: Path, config: HealConfig, calib) -> tuple[list[int], dict]:
    from ..calib_data import CalibSpec, resolve_calibration  # offline only

    data = resolve_calibration(src, config.calib_tokens, calib if calib is not None else CalibSpec(seed=config.seed),
                               seq_len=config.seq_len)
    return data.flat(), dict(data.record)


def _check_source(teacher: torch.nn.Module, ckpt: Checkpoint, src: Path) -> None:
    params = dict(teacher.named_parameters())
    for name, entry in ckpt.index.items():
        p = params.get(name)
        if p is None or tuple(p.shape) != tuple(entry.shape):
            got = "missing" if p is None else f"shape {list(p.shape)}"
            raise ThawedError(f"the dense source {src} does not match the checkpoint: tensor {name!r} is {got}, the "
                              f"checkpoint has {list(entry.shape)}; give the model it was compressed from with --source")


def _kl(teacher, student, tc: TrainableCheckpoint, batches: Batches, n: int = 2) -> float:
    with torch.no_grad():
        w = tc.weights()
        vals = [float(kl_dense_student(run_model(teacher, None, batches.data[b]), run_model(student, w, batches.data[b])))
                for b in range(min(n, len(batches)))]
    return sum(vals) / len(vals)


def heal(ckpt_path: str | Path, out: str | Path, config: HealConfig = HealConfig(), *, source: str | Path | None = None,
         calib=None, resume: bool = False, on_step: Callable[[Progress], None] | None = None) -> HealResult:
    """Heal ``ckpt_path`` into ``out``. ``calib``: a ``CalibSpec`` / ``CalibData`` / text (default: text
    the dense model generates itself, seeded by ``config.seed``). ``on_step`` is called after every step."""
    out = Path(out)
    check_output_path(out)
    sdir = state_dir(out)
    if sdir.exists() and not resume:
        raise ThawedError(f"{sdir} holds the state of an interrupted healing run: add --resume to continue it, "
                          "or delete it to start again")
    if resume and not sdir.exists():
        raise ThawedError(f"--resume: no saved healing state at {sdir}; run without --resume to start")
    torch.manual_seed(config.seed)
    with Checkpoint.open(ckpt_path) as ckpt:
        src = Path(source) if source is not None else Path(str(ckpt.metadata.get("source") or ""))
        if not (src / "config.json").is_file():
            raise ThawedError(f"the checkpoint's dense source {str(src)!r} is not a Hugging Face model directory "
                              "here; give it with --source DIR")
        teacher = load_teacher(src)
        _check_source(teacher, ckpt, src)
        student = make_student(teacher, ckpt)
        tc = TrainableCheckpoint(ckpt, ste=config.ste, dense=teacher.state_dict() if config.ste else None)
        ids, calib_record = _calibration_ids(src, config, calib)
        batches = Batches(ids, config.batch, config.seq_len, config.seed)
        progress, optim_state, meta = Progress(), None, {}
        if resume:
            progress, fields, optim_state, meta = load_state(sdir)
            if not config.same_run(meta.get("config", {})) or meta.get("checkpoint") != str(Path(ckpt_path).resolve()):
                raise ThawedError(f"{sdir} was saved by a run with other settings or another checkpoint; resume "
                                  "with the same command, or delete it to start again")
            tc.load_state(fields)
            log.info("heal: resuming at unit %d step %d (%.0f s trained so far)", progress.unit, progress.step,
                     progress.seconds)
        meta = {"config": config.as_dict(), "checkpoint": str(Path(ckpt_path).resolve()),
                "resumed": int(meta.get("resumed", -1)) + 1, "kl_before": meta.get("kl_before")}
        record = _train(teacher, student, tc, batches, config, progress, optim_state, sdir, meta, on_step)
        record |= {"calibration": calib_record, "calib_tokens": len(ids), "resumed": meta["resumed"]}
        tc.round_to_stored()
        record["kl_after"] = round(_kl(teacher, student, tc, batches), 6)
        path = write_healed(tc, out, record)
        log.info("heal: wrote %s (%s)", out, {k: record[k] for k in ("block_steps", "e2e_steps", "tokens", "seconds")})
    shutil.rmtree(sdir, ignore_errors=True)
    return HealResult(path, record, tc)


def _train(teacher, student, tc: TrainableCheckpoint, batches: Batches, config: HealConfig, progress: Progress,
           optim_state, sdir: Path, meta: dict, on_step) -> dict:
    _, layers = decoder_layers(teacher)
    n_layers = len(layers)
    budget = None if config.minutes is None else config.minutes * 60.0
    base, t0 = progress.seconds, time.monotonic()

    def clock() -> float:
        return base + time.monotonic() - t0

    if meta.get("kl_before") is None:
        meta["kl_before"] = round(_kl(teacher, student, tc, batches), 6)
        log.info("heal: KL(dense || compressed) on the calibration text before healing: %.4g nats/token",
                 meta["kl_before"])
    with _StopFlag() as stop:
        def saver(opt, names) -> None:
            save_state(sdir, progress, tc.state(), optimizer_tensors(opt, names), meta)
            raise HealInterrupted(sdir)

        block = None
        if "block" in config.stages and progress.unit < n_layers:
            block = BlockStage(teacher, student, tc, batches)
            block.seek(progress.unit)
        while progress.unit <= n_layers:
            u = progress.unit
            if progress.step == 0:
                progress.unit_start = progress.seconds
            if u < n_layers and block is not None:
                until = None if budget is None else budget * config.block_share * (u + 1) / n_layers
                params = _with_lr(tc, tc.named_parameters(block.prefix(u)), config.lr, config.lr_codes,
                                  codes="block" in config.ste_stages)
                res = train_unit(f"block {u + 1}/{n_layers}", params, block.loss, batches.tokens_per_batch,
                                 Limits(config.block_steps, None, until), progress, clock, stop.event.is_set,
                                 optim_state, saver, config.log_every, on_step, config.schedule) if params else None
                if res is not None:
                    progress.block_steps += progress.step  # the unit's steps, over every session
                    progress.block_tokens += progress.step * batches.tokens_per_batch
                    progress.history.append(_unit_record(f"layer {u}", progress, res))
                block.advance()
            elif u == n_layers and "e2e" in config.stages:
                def e2e_loss(step: int) -> torch.Tensor:
                    ids = batches.at(step, salt=0)
                    with torch.no_grad():
                        dense = run_model(teacher, None, ids)
                    return kl_dense_student(dense, run_model(student, tc.weights(), ids))

                params = _with_lr(tc, tc.named_parameters(), config.lr_e2e,
                                  config.lr_codes if config.lr_codes_e2e is None else config.lr_codes_e2e,
                                  codes="e2e" in config.ste_stages, codes_of=config.ste_e2e_tensors)
                res = train_unit("end-to-end", params, e2e_loss, batches.tokens_per_batch,
                                 Limits(config.steps, config.tokens, budget), progress, clock, stop.event.is_set,
                                 optim_state, saver, config.log_every, on_step, config.schedule)
                progress.e2e_steps += progress.step
                progress.e2e_tokens += progress.step * batches.tokens_per_batch
                progress.history.append(_unit_record("end-to-end", progress, res))
            progress.unit += 1
            progress.step = 0
            optim_state = None
    per_layer = progress.block_steps / n_layers if n_layers else 0
    return {"stages": list(config.stages), "block_steps": progress.block_steps,
            "block_steps_per_layer": round(per_layer, 2), "e2e_steps": progress.e2e_steps,
            "tokens": progress.block_tokens + progress.e2e_tokens, "block_tokens": progress.block_tokens,
            "e2e_tokens": progress.e2e_tokens, "seconds": round(progress.seconds, 1),
            "seconds_per_e2e_step": round(_unit_seconds(progress, True) / progress.e2e_steps, 3) if progress.e2e_steps else None,
            "seconds_per_block_step": (round(_unit_seconds(progress, False) / progress.block_steps, 3)
                                       if progress.block_steps else None),
            "lr": config.lr, "lr_e2e": config.lr_e2e, "schedule": config.schedule, "ste": config.ste, "lr_codes": config.lr_codes if config.ste else None,
            "ste_stages": list(config.ste_stages) if config.ste else None,
            **({"ste_e2e_tensors": config.ste_e2e_tensors, "lr_codes_e2e": config.lr_codes_e2e}
               if config.ste and "e2e" in config.ste_stages else {}),
            "batch": config.batch, "seq_len": config.seq_len,
            "seed": config.seed, "minutes": config.minutes, "kl_before": meta.get("kl_before"),
            "trainable_fields": tc.count(), "units": progress.history}


def _with_lr(tc: TrainableCheckpoint, params, lr: float, lr_codes: float, codes: bool = True,
             codes_of: str | None = None) -> list:
    """(name, parameter, learning rate); straight-through code fields only when ``codes``, and then
    only of the tensors whose name ``codes_of`` (a regular expression) is found in, when given."""
    def keep(k: str) -> bool:
        return not tc.is_ste(k) or codes and (codes_of is None or re.search(codes_of, k.rpartition("::")[0]) is not None)

    return [(k, p, lr_codes if tc.is_ste(k) else lr) for k, p in params if keep(k)]


def _unit_record(name: str, progress: Progress, res) -> dict:
    """What one unit did. Losses are of this session's steps (a resumed unit's first loss is after the resume)."""
    return {"unit": name, "steps": progress.step, "seconds": round(progress.seconds - progress.unit_start, 2),
            "first_loss": None if res.first_loss is None else round(res.first_loss, 6),
            "last_loss": None if res.last_loss is None else round(res.last_loss, 6), "stop": res.reason}


def _unit_seconds(progress: Progress, e2e: bool) -> float:
    """Seconds spent in the end-to-end unit, or in all layer units (their steps and their inputs)."""
    return float(sum(h["seconds"] for h in progress.history if (h["unit"] == "end-to-end") == e2e))
