"""`medsynapse eval`: a model on the public benchmarks, resumable, one predictions file and one metrics file each.

Per benchmark, under OUT/<benchmark>/:
- `predictions.jsonl`, append-only: one line per sample (id, prompt, raw output, extracted answer, rule, gold,
  correct, ms), or per skipped sample (`skipped`: why). A batch's lines are written together and fsynced, so a kill
  loses at most the batch in flight; a torn last line is cut off on restart. Restarting skips ids already written,
  and batches keep their boundaries (ids are consumed in data order), so a resumed run generates exactly what an
  uninterrupted one would.
- `run.json`: the settings the predictions were made with; resuming with other settings is refused.
- `metrics.json`: computed from the predictions file alone (accuracy, n, unparseable, rules fired, breakdowns, closed
  definition, skips), plus an `efficiency` block measured in this process.
Then OUT/summary.md, summary.csv and summary.png (eval/summary.py).

Under `torchrun` / `accelerate launch`, batch k goes to rank k % world (the same batches as one process, so the same
outputs); each rank appends to its own `predictions.partN.jsonl`, and rank 0 merges them into `predictions.jsonl` in
data order once all ranks are done. A restart (with any number of processes) reads the merged file and any parts.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import cast

import torch
from tqdm.auto import tqdm

from medsynapse.answers import check_answer_format, extract, is_correct
from medsynapse.data.dataset import check_image_limit, with_answer_format
from medsynapse.data.images import load_image
from medsynapse.data.schema import DataError, Sample
from medsynapse.data.sources import Benchmark, load_source
from medsynapse.engines import check_engine
from medsynapse.eval.efficiency import PeakRSS, rss_mb
from medsynapse.eval.report import write_json
from medsynapse.locking import LOCK_NAME, hold_for_launch, write_text_atomic, writes_into
from medsynapse.model.bases import BaseFolders
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.vlm import core_vlm

PREDICTIONS = "predictions.jsonl"
REASONING_BUDGET = 1024  # new tokens for a `reasoning` reply when none is given (the paper's max generation length)


@dataclass
class EvalSettings:
    batch_size: int = 8
    max_new_tokens: int | None = None  # None: each benchmark's protocol budget (32; MMMU 128, HGV bundle 64)
    branch: str | None = None  # None: the model's own memory (A_psi for a student, P_phi for a teacher)
    skip_bad: bool = False
    limit: int | None = None  # first N scored samples per benchmark (smoke runs)
    max_pixels: int | None = None  # cap the VLM's image resolution (Qwen's default budget can run out of memory)
    source_options: dict[str, dict] = field(default_factory=dict)  # per-benchmark loader options
    # direct | reasoning (analysis first, the final answer in <answer></answer>); None: the format the model was
    # trained with (its folder records it; "direct" for a plain VLM)
    answer_format: str | None = None
    # hf: transformers' generate | vllm: generation through vLLM with the same memory (engines/vllm_engine.py; needs
    # the .venv-vllm environment, one process)
    engine: str = "hf"


def read_predictions(path: Path, repair: bool = True) -> list[dict]:
    """Finished lines; a torn last line (killed mid-write) is ignored, and cut off the file when `repair` (only the
    file's writer repairs it: another rank may be appending to it), a bad line elsewhere is an error."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    good_end = data.rfind(b"\n") + 1
    if good_end < len(data) and repair:  # the last line has no newline: it was being written when the process died
        with path.open("r+b") as handle:
            handle.truncate(good_end)
    lines = []
    for number, line in enumerate(data[:good_end].decode("utf-8").splitlines(), start=1):
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {number}: not valid JSON ({err.msg}); fix or remove the file") from None
    return lines


def append_lines(path: Path, lines: list[dict]) -> None:
    with writes_into(path.parent, path.name), path.open("a", encoding="utf-8") as handle:  # a torn line is cut at
        handle.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))  # the next start
        handle.flush()
        os.fsync(handle.fileno())


def set_max_pixels(model: MedSynapseV, max_pixels: int) -> None:
    size = model.processor.image_processor.size
    try:
        size["longest_edge"] = max_pixels
    except TypeError:
        size.longest_edge = max_pixels


class BenchmarkRun:
    """Generation for one benchmark into its output folder, resuming what is there; rank `rank` of `world`."""

    def __init__(self, model: MedSynapseV, benchmark: Benchmark, out_dir: Path, settings: EvalSettings,
                 model_path: str, rank: int = 0, world: int = 1, barrier: Callable[[], None] = lambda: None,
                 engine=None):
        self.model, self.benchmark, self.settings = model, benchmark, settings
        self.engine = engine  # a VLLMEngine for `engine: vllm`, else None (transformers)
        self.out_dir = out_dir
        self.path = out_dir / PREDICTIONS
        self.rank, self.world, self.barrier = rank, world, barrier
        self.own_path = self.path if world == 1 else out_dir / f"predictions.part{rank}.jsonl"
        self.samples = benchmark.samples[: settings.limit] if settings.limit else benchmark.samples
        # settings.answer_format: a format here (run_benchmarks resolves None to the model's own first)
        self.samples = with_answer_format(self.samples, cast(str, settings.answer_format))
        # the protocol's answer budget; a reply in the reasoning format also writes its analysis (the paper's 1024)
        self.max_new_tokens = settings.max_new_tokens or (REASONING_BUDGET if settings.answer_format == "reasoning"
                                                          else benchmark.max_new_tokens)
        self.run_info = {"model": model_path, "benchmark": benchmark.name, "source": benchmark.source,
                         "closed_definition": benchmark.closed_definition, "max_new_tokens": self.max_new_tokens,
                         "branch": settings.branch, "max_pixels": settings.max_pixels, "limit": settings.limit,
                         "batch_size": settings.batch_size, "answer_format": settings.answer_format}
        if settings.engine != "hf":  # recorded only when not the default, so earlier runs still resume
            self.run_info["engine"] = settings.engine

    def check_run_info(self) -> None:
        path = self.out_dir / "run.json"
        if path.is_file():
            old = json.loads(path.read_text())
            # what changes a prediction; a new --limit or --batch-size only changes which ids run and how fast
            changed = [k for k in self.run_info if k not in ("limit", "batch_size") and old.get(k) != self.run_info[k]]
            if changed and self.all_lines():  # the merged file or parts of a killed multi-process run
                raise ValueError(f"{self.out_dir}: holds predictions made with other settings ({', '.join(changed)} "
                                 "differ); use another --output or delete the folder")
        write_json(path, self.run_info)

    def all_lines(self) -> list[dict]:
        """The merged predictions, then any per-rank parts (from a multi-process run killed before its merge)."""
        lines = read_predictions(self.path, repair=self.own_path == self.path)
        for part in sorted(self.out_dir.glob("predictions.part*.jsonl")):
            lines += read_predictions(part, repair=part == self.own_path)
        return lines

    def merge(self) -> None:
        """Rank 0, after every rank is done: one predictions.jsonl in data order, written atomically; parts removed."""
        parts = sorted(self.out_dir.glob("predictions.part*.jsonl"))
        if not parts:
            return
        latest = {line["id"]: line for line in latest_per_id(self.all_lines())}
        order = [s.id for s in self.benchmark.samples if s.id in latest]
        listed = set(order)
        order += [i for i in latest if i not in listed]  # ids from an earlier, larger --limit
        write_text_atomic(self.path, "".join(json.dumps(latest[i], ensure_ascii=False) + "\n" for i in order))
        for part in parts:
            part.unlink()

    def run(self, on_batch: Callable[[int], None] | None = None) -> dict:
        """Generate what is missing; returns the efficiency of this invocation (None fields if nothing ran)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            self.check_run_info()
        self.barrier()
        done = {line["id"] for line in latest_per_id(self.all_lines()) if "skipped" not in line}
        size = self.settings.batch_size
        chunks = [self.samples[i:i + size] for i in range(0, len(self.samples), size)]
        todo = [[s for s in chunk if s.id not in done] for k, chunk in enumerate(chunks) if k % self.world == self.rank]
        todo = [chunk for chunk in todo if chunk]
        n_new = sum(len(c) for c in todo)
        device = next(core_vlm(self.model.vlm).parameters()).device
        elapsed, generated = 0.0, 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = rss_mb()
        with PeakRSS() as peak, tqdm(total=n_new, desc=self.benchmark.name, unit="q", disable=self.rank != 0) as bar:
            for index, chunk in enumerate(todo):
                lines, seconds = self.answer_chunk(chunk, device)
                append_lines(self.own_path, lines)
                elapsed += seconds
                generated += sum("skipped" not in line for line in lines)
                bar.update(len(chunk))
                if on_batch is not None:
                    on_batch(index)
        self.barrier()
        if self.rank == 0:
            self.merge()
        if not generated:
            return {"ms_per_sample": None, "peak_mem_mb": None, "generated": 0}
        memory = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                  else peak.peak - before)
        return {"ms_per_sample": 1000 * elapsed / generated, "peak_mem_mb": memory, "generated": generated}

    @torch.no_grad()
    def answer_chunk(self, chunk: list[Sample], device: torch.device) -> tuple[list[dict], float]:
        lines, ready, images = [], [], []
        for sample in chunk:
            try:
                check_image_limit([sample], self.model.max_images, self.benchmark.source)
                images.append([load_image(path, sample) for path in sample.images])
                ready.append(sample)
            except DataError as err:
                if not self.settings.skip_bad:
                    raise DataError(f"{self.benchmark.name} ({self.benchmark.source}): {err}") from None
                lines.append({"id": sample.id, "skipped": str(err)})
        if not ready:
            return lines, 0.0
        start = time.perf_counter()
        texts = self.generate_texts(ready, images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        ms = 1000 * seconds / len(ready)
        shown = self.memory_inputs(ready, images)
        for sample, text in zip(ready, texts):
            lines.append({**self.score(sample, text, ms), **shown.get(sample.id, {})})
        return lines, seconds

    def generate_texts(self, samples: list[Sample], images: list[list]) -> list[str]:
        """Greedy answers to a chunk: `MedSynapseV.answer_encoded`, or the same through vLLM (equal tokens)."""
        if self.engine is not None:
            outputs = self.engine.generate(images, [s.model_prompt for s in samples], self.max_new_tokens,
                                           self.settings.branch, systems=[s.system for s in samples])
            return [out[0].text for out in outputs]
        items = [self.model.prompts.encode(imgs, s.model_prompt, system=s.system) for imgs, s in zip(images, samples)]
        return self.model.answer_encoded(items, [img for imgs in images for img in imgs], self.max_new_tokens,
                                         self.settings.branch)

    def memory_inputs(self, samples: list[Sample], images: list[list]) -> dict[str, dict]:
        """For the chunk's first question with several images, when the memory comes from the prior encoder: what
        each image gave it (file, prior grid, token count, region size, finding, token RMS), recorded in that
        question's prediction line so a reader can check by eye that every image reached the memory. Timed apart
        from the answers (one more encoder pass on one question)."""
        if self.model.encoder is None or self.model.sampler is None or self.model.autonomous is not None:
            return {}
        for sample, imgs in zip(samples, images):
            if len(imgs) > 1:
                summary = self.model.prior_summary(imgs)
                return {sample.id: {"memory_inputs": [{"image": Path(path).name, **part}
                                                      for path, part in zip(sample.images, summary)]}}
        return {}

    def score(self, sample: Sample, text: str, ms: float) -> dict:
        if self.benchmark.scorable:
            correct, got = is_correct(text, sample.answer, sample.answer_type, sample.options,
                                      cast(str, self.settings.answer_format))
        else:
            correct, got = None, extract(text, sample.answer_type, sample.options,
                                         cast(str, self.settings.answer_format))
        return {"id": sample.id, "prompt": sample.model_prompt, **({"system": sample.system} if sample.system else {}),
                "n_images": len(sample.images), "raw": text,
                "extracted": got.answer, "rule": got.rule, "gold": sample.answer, "correct": correct,
                "answer_type": sample.answer_type, "modality": sample.modality,
                "question_type": sample.question_type, "groups": sample.groups, "ms": round(ms, 3)}


def _accuracy_table(lines: list[dict], key: Callable[[dict], str]) -> dict:
    groups: dict[str, list[bool]] = defaultdict(list)
    for line in lines:
        groups[key(line)].append(bool(line["correct"]))
    return {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items()) if k}


def latest_per_id(lines: list[dict]) -> list[dict]:
    """One line per id: an answer over a skip (a sample skipped earlier and answered after a fix counts once; answered
    ids are never redone, so an answer is always the newer line, whichever file it is in), else the last line."""
    chosen: dict[str, dict] = {}
    for line in lines:
        if line["id"] not in chosen or "skipped" in chosen[line["id"]] or "skipped" not in line:
            chosen[line["id"]] = line
    return list(chosen.values())


def compute_metrics(benchmark: Benchmark, lines: list[dict], settings: EvalSettings) -> dict:
    """Everything but `efficiency` depends only on the predictions, so a resumed run reproduces it exactly.

    Only this run's questions count (an earlier run with a larger --limit may have answered more).
    """
    wanted = {s.id for s in (benchmark.samples[: settings.limit] if settings.limit else benchmark.samples)}
    lines = [line for line in latest_per_id(lines) if line["id"] in wanted]
    scored = [line for line in lines if "skipped" not in line]
    skipped = benchmark.skipped + [{"id": line["id"], "error": line["skipped"]} for line in lines
                                   if "skipped" in line]
    n = len(scored)
    metrics = {"benchmark": benchmark.name, "source": benchmark.source,
               "closed_definition": benchmark.closed_definition, "scorable": benchmark.scorable, "n": n,
               "n_records": benchmark.n_records, "excluded": benchmark.excluded,
               "unparseable": sum(line["extracted"] is None for line in scored),
               "rules": dict(sorted(Counter(line["rule"] for line in scored).items())),
               "n_skipped": len(skipped), "skipped": skipped, "limit": settings.limit}
    if not benchmark.scorable:
        return {**metrics, "accuracy": None, "correct": None}
    correct = sum(bool(line["correct"]) for line in scored)
    group_keys = sorted({k for line in scored for k in line.get("groups", {})})
    return {**metrics, "accuracy": correct / n if n else None, "correct": correct,
            "by_modality": _accuracy_table(scored, lambda x: x.get("modality", "")),
            "by_question_type": _accuracy_table(scored, lambda x: x.get("question_type", "")),
            "by_answer_type": _accuracy_table(scored, lambda x: x.get("answer_type", "")),
            # (mypy cannot infer a lambda whose default argument binds the loop variable: "Cannot infer type")
            "by_group": {g: _accuracy_table(scored, lambda x, g=g: x.get("groups", {}).get(g, ""))  # type: ignore[misc]
                         for g in group_keys}}


def check_inputs(model_path: str, benchmarks: list[str], source_options: dict[str, dict] | None = None) -> None:
    """Unknown benchmark names or loader options and a model path that is not a local model folder, refused before
    anything is written."""
    from medsynapse.data.sources import SOURCES, check_options
    from medsynapse.model.medsynapse import MANIFEST
    from medsynapse.model.processor import resolve_local_model

    unknown = [name for name in benchmarks if name not in SOURCES]
    if unknown or not benchmarks:
        raise ValueError(f"unknown benchmark(s) {unknown or benchmarks}; known: {', '.join(SOURCES)}")
    for name, options in (source_options or {}).items():
        if name in SOURCES:
            check_options(name, options)
    if not (Path(model_path) / MANIFEST).is_file():
        resolve_local_model(model_path)


def evaluate_benchmarks(model_path: str, benchmarks: list[str], data_root: str | Path, output: str | Path,
                        settings: EvalSettings | None = None,
                        on_batch: Callable[[str, int], None] | None = None,
                        bases: BaseFolders | None = None) -> dict[str, dict]:
    """Run every benchmark (resuming), write metrics and the summary; returns metrics per benchmark. `bases`: the
    model folder's base VLM / encoder folders given explicitly (model/bases.py; not part of the settings: where a
    base sits changes no answer)."""
    from accelerate import PartialState

    # one process, or torchrun / accelerate launch; cpu=True is what makes accelerate see a gloo run on CPU
    state = PartialState(cpu=not torch.cuda.is_available())
    settings = settings or EvalSettings()
    output = Path(output)
    check_inputs(model_path, benchmarks, settings.source_options)  # before the output folder is created
    check_engine(settings.engine)
    if settings.answer_format is not None:
        check_answer_format(settings.answer_format)
    # An earlier run's folder (its lock file is there): its lock first, so a busy folder is refused at once. A new
    # folder: the data and the model are read first, so that a refusal (a missing dataset, a bad record, a damaged
    # model) leaves nothing behind, no lock file either (a Unix lock file must never be deleted: a waiter would lock
    # the deleted inode while another process locks a new one).
    early = _agreed(state, (output / LOCK_NAME).is_file())
    with ExitStack() as stack:
        if early:
            hold_for_launch(stack, output, "evaluation", state.is_main_process, state.num_processes)
        benches, model = _load_or_leave_nothing(state, model_path, benchmarks, data_root, output, settings, bases)
        if not early:
            hold_for_launch(stack, output, "evaluation", state.is_main_process, state.num_processes)
        return _evaluate_locked(state, model_path, model, benches, output, settings, on_batch)


def _agreed(state, value: bool) -> bool:
    """The main process's `value` on every rank (each rank then takes the same path through the collectives)."""
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box)
        return box[0]
    return value


def _load_or_leave_nothing(state, model_path: str, benchmarks: list[str], data_root: str | Path, output: Path,
                           settings: EvalSettings,
                           bases: BaseFolders | None = None) -> tuple[dict[str, Benchmark], MedSynapseV]:
    """Every benchmark (embedded images go to OUTPUT/.images) and the model; when either is refused, the folders
    this call created (the output folder, its image cache) are removed again, so the refusal writes nothing."""
    import shutil

    images = output / ".images"
    created = [path for path in (output, images) if not path.exists()]
    try:
        benches = {name: load_source(name, data_root, images, skip_bad=settings.skip_bad,
                                     **settings.source_options.get(name, {})) for name in benchmarks}
        model = MedSynapseV.from_pretrained(model_path, merge_adapter=True, bases=bases)
    except BaseException:
        if state.is_main_process:
            if images in created:
                shutil.rmtree(images, ignore_errors=True)
            if output in created:
                with suppress(OSError):
                    output.rmdir()  # only when empty: never another process's files
        raise
    return benches, model


def start_engine(settings: EvalSettings, model: MedSynapseV, benches: dict[str, Benchmark], output: Path,
                 processes: int):
    """None for transformers; for `vllm` a VLLMEngine over the model (exported to OUTPUT/.vllm, after --max-pixels
    so vLLM's processor has the same budget), room for the most images any question has."""
    if settings.engine == "hf":
        return None
    if processes > 1:
        raise ValueError("engine vllm runs in one process (vLLM batches itself); launch without torchrun")
    from medsynapse.engines.vllm_engine import VLLMEngine

    most = max((len(s.images) for bench in benches.values() for s in bench.samples), default=1)
    return VLLMEngine(model, output / ".vllm", max_images=max(1, most), max_model_len=4096)


def _evaluate_locked(state, model_path: str, model: MedSynapseV, benches: dict[str, Benchmark], output: Path,
                     settings: EvalSettings, on_batch: Callable[[str, int], None] | None) -> dict[str, dict]:
    from accelerate.utils import gather_object

    from medsynapse.eval.summary import write_summary

    model.to(state.device)
    if settings.answer_format is None:  # the format the model was trained with
        settings = replace(settings, answer_format=model.answer_format)
    if settings.max_pixels:
        set_max_pixels(model, settings.max_pixels)
    engine = start_engine(settings, model, benches, output, state.num_processes)
    results = {}
    for name, bench in benches.items():
        out_dir = output / name
        job = BenchmarkRun(model, bench, out_dir, settings, str(model_path), state.process_index,
                           state.num_processes, state.wait_for_everyone, engine)
        # (mypy cannot infer a lambda whose default argument binds the loop variable: "Cannot infer type")
        efficiency = job.run(None if on_batch is None else lambda i, name=name: on_batch(name, i))  # type: ignore[misc]
        if state.num_processes > 1:
            efficiency = combine_efficiency(gather_object([efficiency]))
        if not state.is_main_process:
            continue
        metrics = compute_metrics(bench, read_predictions(job.path), settings)
        old = json.loads((out_dir / "metrics.json").read_text()) if (out_dir / "metrics.json").is_file() else {}
        if efficiency["ms_per_sample"] is None and "efficiency" in old:
            metrics["efficiency"] = old["efficiency"]  # nothing left to generate: the last measurement, as it was
        else:
            metrics["efficiency"] = {**efficiency, "batch_size": settings.batch_size,
                                     "processes": state.num_processes,
                                     "device": str(next(core_vlm(model.vlm).parameters()).device),
                                     "settings": asdict(settings)}
        write_json(out_dir / "metrics.json", metrics)
        results[name] = metrics
    if state.is_main_process:
        write_summary(output, label=Path(model_path).name)
        record_in_card(model_path, results, output)
    state.wait_for_everyone()
    return results


def record_in_card(model_path: str, results: dict[str, dict], output: Path) -> None:
    """The benchmarks' accuracies in the model folder's card (model/card.py), when it has one (a MedSynapse folder;
    a plain VLM folder is left alone)."""
    from medsynapse.model.card import set_evaluation

    lines = [f"`medsynapse eval` into `{Path(output).name}`:", "", "| benchmark | questions | accuracy | unparseable |",
             "|---|---|---|---|"]
    for name, metrics in results.items():
        accuracy = "—" if metrics.get("accuracy") is None else f"{metrics['accuracy']:.3f}"
        lines.append(f"| {name} | {metrics.get('n')} | {accuracy} | {metrics.get('unparseable')} |")
    set_evaluation(model_path, "\n".join(lines))


def combine_efficiency(per_rank: list[dict]) -> dict:
    """ms per question weighted by what each rank generated (per-process time: ranks run in parallel); peak = max."""
    ran = [e for e in per_rank if e.get("generated")]
    if not ran:
        return {"ms_per_sample": None, "peak_mem_mb": None, "generated": 0}
    total = sum(e["generated"] for e in ran)
    return {"ms_per_sample": sum(e["ms_per_sample"] * e["generated"] for e in ran) / total,
            "peak_mem_mb": max(e["peak_mem_mb"] for e in ran), "generated": total}
