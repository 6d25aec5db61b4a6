"""Autoscaling through the launch command: ``thawed serve-cluster CKPT --min-replicas 1
--max-replicas 2 --target-ongoing-requests 1``, then ``--clients`` streaming clients for
``--seconds``; prints which replicas answered in each 10 s window. Checks: every request is 200,
the first round of requests all go to one replica, two replicas answer by the end (Serve added one under load).

    python benchmarks/cluster_autoscale.py CKPT                     # figures in docs/CLUSTER.md
"""

from __future__ import annotations

import argparse
import collections
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=90.0)
    p.add_argument("--max-tokens", type=int, default=120)
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ["thawed", "serve-cluster", args.ckpt, "--port", str(port), "--device", "cpu", "--min-replicas", "1",
           "--max-replicas", "2", "--target-ongoing-requests", "1", "--replica-cpus", "0.5"]
    print(" ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ready = threading.Event()

    def reader():
        for line in proc.stdout:
            if "serving" in line and "Ray Serve" in line:
                ready.set()
            if "Adding" in line or "Removing" in line:
                print("serve:", line.strip().split(" -- ")[-1], flush=True)

    threading.Thread(target=reader, daemon=True).start()
    try:
        if not ready.wait(600):
            print("serve-cluster did not start in 600 s", file=sys.stderr)
            return 1
        url = f"http://127.0.0.1:{port}"
        seen: list[tuple[float, int, str]] = []
        stop = threading.Event()
        t0 = time.monotonic()
        body = {"prompt": "the", "max_tokens": args.max_tokens, "stream": True, "ignore_eos": True}

        def client():
            with httpx.Client(base_url=url, timeout=120) as c:
                while not stop.is_set():
                    with c.stream("POST", "/v1/completions", json=body) as r:
                        for _ in r.iter_lines():
                            pass
                    seen.append((time.monotonic() - t0, r.status_code, r.headers.get("x-thawed-replica", "")))

        clients = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
        for c in clients:
            c.start()
        time.sleep(args.seconds)
        stop.set()
        for c in clients:
            c.join(120)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    windows: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for t, status, replica in seen:
        windows[int(t // 10) * 10][f"{status} {replica}"] += 1
    for start in sorted(windows):
        print(f"t={start:3d}-{start + 10:3d} s  {dict(windows[start])}")
    first = {r for _, _, r in sorted(seen)[:args.clients]}  # the first round of requests: one replica
    replicas = {r for _, _, r in seen}
    ok = all(s == 200 for _, s, _ in seen) and len(first) == 1 and len(replicas) == 2
    print("ok" if ok else f"FAILED: statuses {collections.Counter(s for _, s, _ in seen)}, first {first}, all {replicas}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
