"""The resumable state of an interrupted healing run, in a folder beside the output
(``OUT.heal-state/``): ``fields.safetensors`` (every trainable field, float32, and the current
optimiser's moments) and ``state.json`` (stage, layer, step, counters, the settings). Written into a
temporary folder and renamed, so a kill while saving leaves the previous state whole. No pickle."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from thawed.codecs.errors import ThawedError

__all__ = ["Progress", "state_dir", "save_state", "load_state", "optimizer_tensors", "restore_optimizer"]

VERSION = 1


@dataclass
class Progress:
    """Where a run is: unit ``unit`` (0..layers-1 are stage (a)'s layers, ``layers`` is stage (b)) and
    the optimiser steps done in it, plus what every finished unit did."""

    unit: int = 0
    step: int = 0
    seconds: float = 0.0  # training time spent so far (all sessions)
    unit_start: float = 0.0  # ``seconds`` when the current unit began
    block_steps: int = 0
    block_tokens: int = 0
    e2e_steps: int = 0
    e2e_tokens: int = 0
    history: list[dict] = field(default_factory=list)


def state_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.heal-state"


def save_state(folder: Path, progress: Progress, fields: dict[str, Tensor], optim: dict[str, Tensor],
               meta: dict) -> None:
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"field/{k}": v.contiguous() for k, v in fields.items()}
    tensors |= {f"optim/{k}": v.contiguous() for k, v in optim.items()}
    save_file(tensors, str(tmp / "fields.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"version": VERSION, "progress": asdict(progress)} | meta, indent=1))
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():
        os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_state(folder: Path) -> tuple[Progress, dict[str, Tensor], dict[str, Tensor], dict]:
    try:
        meta = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "fields.safetensors"))
    except (OSError, ValueError) as exc:
        raise ThawedError(f"cannot read the healing state in {folder} ({exc}); delete it and start again "
                          "without --resume") from None
    if meta.get("version") != VERSION:
        raise ThawedError(f"{folder} holds healing state version {meta.get('version')}, this thawed reads "
                          f"{VERSION}; start again without --resume")
    progress = Progress(**meta.pop("progress"))
    fields = {k[6:]: v for k, v in tensors.items() if k.startswith("field/")}
    optim = {k[6:]: v for k, v in tensors.items() if k.startswith("optim/")}
    return progress, fields, optim, meta


def optimizer_tensors(opt: torch.optim.Adam, names: list[str]) -> dict[str, Tensor]:
    """Adam's moments and step count by parameter name (the order of ``names`` is the parameters')."""
    out: dict[str, Tensor] = {}
    params = [p for g in opt.param_groups for p in g["params"]]
    for name, p in zip(names, params):
        st = opt.state.get(p)
        if st:
            out[f"{name}/exp_avg"] = st["exp_avg"].detach().clone()
            out[f"{name}/exp_avg_sq"] = st["exp_avg_sq"].detach().clone()
            out[f"{name}/step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).clone()
    return out


def restore_optimizer(opt: torch.optim.Adam, names: list[str], saved: dict[str, Tensor]) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    for name, p in zip(names, params):
        if f"{name}/exp_avg" in saved:
            opt.state[p] = {"step": saved[f"{name}/step"].reshape(()).clone(),
                            "exp_avg": saved[f"{name}/exp_avg"].clone(),
                            "exp_avg_sq": saved[f"{name}/exp_avg_sq"].clone()}
