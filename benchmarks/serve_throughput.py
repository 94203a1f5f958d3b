"""Requests per second of `medsynapse serve` with dynamic batching against the same server answering one request at a
time (`max_batch` 1), on the same requests, side by side in one run.

Each server runs in this process (uvicorn in a thread, on 127.0.0.1), gets the same `--requests` chat completions
(held-out SynthMed questions with their scans as PNG data URIs) from `--concurrency` client threads, after a warm-up of
8 requests; the batched server's answers are checked equal to the one-at-a-time server's. Prints a markdown table and
writes the numbers as JSON.
Usage: python benchmarks/serve_throughput.py --model runs/demo/stage2 --data DATA/test.jsonl
       [--requests 256 --concurrency 32 --max-batch 32 --max-wait-ms 20 --json runs/serve_throughput.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import threading
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


def run_server(model, model_dir: str, settings, bodies: list[dict], concurrency: int) -> tuple[float, list[str]]:
    """Requests per second and the answers, for one server configuration."""
    import httpx
    import uvicorn

    from medsynapse.serve import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(model_dir, settings, model=model), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600,
                          limits=httpx.Limits(max_connections=concurrency)) as client:
            def ask(body):
                reply = client.post("/v1/chat/completions", json=body)
                reply.raise_for_status()
                return reply.json()["choices"][0]["message"]["content"]

            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(ask, bodies[:8]))  # warm-up
                start = time.perf_counter()
                answers = list(pool.map(ask, bodies))
                seconds = time.perf_counter() - start
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    return len(bodies) / seconds, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="a SynthMed split (test.jsonl)")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from medsynapse.model.medsynapse import MedSynapseV
    from medsynapse.serve import ServeSettings

    model = MedSynapseV.from_pretrained(args.model, merge_adapter=True)
    bodies = _bodies(args.data, args.requests)
    results = {}
    for name, batch in (("batched", args.max_batch), ("one at a time", 1)):
        settings = ServeSettings(max_batch=batch, max_wait_ms=args.max_wait_ms if batch > 1 else 0.0,
                                 max_queue=args.requests + 16)
        rate, answers = run_server(model, args.model, settings, bodies, args.concurrency)
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
