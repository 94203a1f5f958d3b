"""Requests per second of `medsynapse serve` with dynamic batching against the same server answering one request at a
time (`--max-batch 1`), on the same requests, side by side in one run.

Each server is the real command (`medsynapse serve`, a separate process on 127.0.0.1, as users run it), so the
client's own work (building and reading HTTP messages) does not share the server's interpreter. It gets the same
`--requests` chat completions (held-out SynthMed questions with their scans as PNG data URIs, bodies encoded once up
front) from `--concurrency` client threads, after a warm-up of 8 requests; the batched server's answers are checked
equal to the one-at-a-time server's. Prints a markdown table and writes the numbers as JSON.
Usage: python benchmarks/serve_throughput.py --model runs/demo/stage2 --data DATA/test.jsonl
       [--requests 512 --concurrency 32 --max-batch 32 --max-wait-ms 20 --json runs/serve_throughput.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bodies(data: str, count: int) -> list[dict]:
    from medsynapse.data.schema import read_samples

    samples = [s for s in read_samples(data) if s.answer_type != "caption" and s.family == "lesion"]
    bodies = []
    for i in range(count):
        sample = samples[i % len(samples)]
        uri = "data:image/png;base64," + base64.b64encode(Path(sample.images[0]).read_bytes()).decode()
        bodies.append({"max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": sample.question}]}]})
    return bodies


def run_server(model_dir: str, max_batch: int, max_wait_ms: float, bodies: list[bytes],
               concurrency: int) -> tuple[float, list[str]]:
    """Requests per second and the answers, for one server configuration (a `medsynapse serve` process)."""
    import httpx

    port = _free_port()
    command = [sys.executable, "-m", "medsynapse.cli", "serve", "--model", model_dir, "--port", str(port),
               "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--max-queue",
               str(len(bodies) + 16)]
    # the server's own messages go to a file (a pipe nobody reads could fill and block it)
    with tempfile.TemporaryFile(mode="w+") as log:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600,
                              limits=httpx.Limits(max_connections=concurrency)) as client:
                _wait_until_up(client, server, log)

                def ask(body: bytes) -> str:
                    reply = client.post("/v1/chat/completions", content=body,
                                        headers={"content-type": "application/json"})
                    reply.raise_for_status()
                    return reply.json()["choices"][0]["message"]["content"]

                with ThreadPoolExecutor(concurrency) as pool:
                    list(pool.map(ask, bodies[:8]))  # warm-up
                    start = time.perf_counter()
                    answers = list(pool.map(ask, bodies))
                    seconds = time.perf_counter() - start
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    return len(bodies) / seconds, answers


def _wait_until_up(client, server: subprocess.Popen, log, limit_s: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"medsynapse serve exited: {log.read()[-2000:]}")
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"medsynapse serve did not come up in {limit_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="a SynthMed split (test.jsonl)")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    bodies = [json.dumps(body).encode() for body in _bodies(args.data, args.requests)]
    results = {}
    for name, batch in (("batched", args.max_batch), ("one at a time", 1)):
        rate, answers = run_server(args.model, batch, args.max_wait_ms if batch > 1 else 0.0, bodies,
                                   args.concurrency)
        results[name] = {"requests_per_s": rate, "max_batch": batch, "answers": answers}
    same = results["batched"]["answers"] == results["one at a time"]["answers"]
    ratio = results["batched"]["requests_per_s"] / results["one at a time"]["requests_per_s"]
    print("| server | max batch | requests / s |\n|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['max_batch']} | {row['requests_per_s']:.1f} |")
    print(f"ratio {ratio:.2f}x; {args.requests} requests, {args.concurrency} concurrent; answers identical: {same}")
    if args.json:
        summary = {"ratio": ratio, "answers_identical": same, "requests": args.requests,
                   "concurrency": args.concurrency,
                   **{k: {"requests_per_s": v["requests_per_s"], "max_batch": v["max_batch"]}
                      for k, v in results.items()}}
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
