"""Inference cost per sample: median latency over timed single-sample answers, and peak memory.

Every model answers the same questions with the same number of generated tokens (`min_new_tokens` =
`max_new_tokens`), one sample at a time, after warm-up; the whole answer path is timed (prior encoder and sampler for
the teacher, A_psi for the student). Memory: on CUDA the peak allocated bytes; on CPU the peak resident set size above
the level before the model was loaded (sampled every 2 ms by a thread), which counts weights and activations.
`measure_isolated` runs each model in a fresh process: in a process that already loaded and freed other models the
allocator reuses freed pages and the CPU figure under-reports.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from medsynapse.data.images import load_image
from medsynapse.data.schema import Sample


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    def __init__(self):
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def measure(load_model: Callable[[], Any], samples: list[Sample], n_timed: int = 20, warmup: int = 3,
            max_new_tokens: int = 8, fixed_length: bool = True) -> dict:
    """Load with `load_model()`, then time `answer` on `warmup + n_timed` samples (the first `warmup` untimed).
    `fixed_length`: every answer is `max_new_tokens` long (equal work per model); False: each stops at its end of
    sequence (what a user waits for, e.g. a reasoning row's analysis), `max_new_tokens` at most."""
    if len(samples) < warmup + n_timed:
        raise ValueError(f"need {warmup + n_timed} samples, got {len(samples)}")
    gc.collect()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = rss_mb()
    images = [load_image(s.images[0], s) for s in samples[:warmup + n_timed]]
    with PeakRSS() as rss:
        model = load_model()
        times = []
        for index, (sample, image) in enumerate(zip(samples, images)):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model.answer([image], [sample.model_prompt], max_new_tokens=max_new_tokens,
                         **({"min_new_tokens": max_new_tokens} if fixed_length else {}))
            if cuda:
                torch.cuda.synchronize()
            if index >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss.peak - before
    del model
    gc.collect()
    return {"ms_per_sample": statistics.median(times), "peak_mem_mb": round(peak, 1), "n_timed": len(times),
            "max_new_tokens": max_new_tokens, "fixed_length": fixed_length,
            "memory_measure": "cuda_max_allocated" if cuda else "cpu_peak_rss_delta"}


def compare_latency(loaders: dict[str, Callable[[], Any]], samples: list[Sample], n_timed: int = 20,
                    warmup: int = 3, max_new_tokens: int = 8) -> dict[str, float]:
    """Median ms/sample of several models timed side by side: for each sample, every model in turn (rotating the
    order), so machine drift hits all of them alike."""
    if len(samples) < warmup + n_timed:
        raise ValueError(f"need {warmup + n_timed} samples, got {len(samples)}")
    models = {name: load() for name, load in loaders.items()}
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index, sample in enumerate(samples[:warmup + n_timed]):
        image = load_image(sample.images[0], sample)
        order = names[index % len(names):] + names[:index % len(names)]
        for name in order:
            start = time.perf_counter()
            models[name].answer([image], [sample.model_prompt], max_new_tokens=max_new_tokens,
                                min_new_tokens=max_new_tokens)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if index >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def measure_isolated(model_dir: str, data_file: str, question_ids: list[str], n_timed: int = 20, warmup: int = 3,
                     max_new_tokens: int = 8, fixed_length: bool = True) -> dict:
    """`measure` in a fresh Python process (clean CPU peak memory), on the samples with the given ids, in order."""
    command = [sys.executable, "-m", "medsynapse.eval.efficiency", "--model", model_dir, "--data", data_file,
               "--n-timed", str(n_timed), "--warmup", str(warmup), "--max-new-tokens", str(max_new_tokens),
               "--ids", ",".join(question_ids), *([] if fixed_length else ["--until-eos"])]
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"efficiency run for {model_dir} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _main() -> None:
    parser = argparse.ArgumentParser(description="time one model's answers (used by measure_isolated)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--ids", required=True)
    parser.add_argument("--n-timed", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--until-eos", action="store_true", help="each answer stops at its end of sequence")
    args = parser.parse_args()
    from transformers.utils import logging

    from medsynapse.data.schema import read_samples
    from medsynapse.model.medsynapse import MedSynapseV

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    by_id = {s.id: s for s in read_samples(args.data)}
    samples = [by_id[i] for i in args.ids.split(",")]
    result = measure(lambda: MedSynapseV.from_pretrained(args.model, merge_adapter=True), samples, args.n_timed,
                     args.warmup, args.max_new_tokens, fixed_length=not args.until_eos)
    print(json.dumps(result))


if __name__ == "__main__":
    _main()
