"""`medsynapse eval`: summary over all fixture benchmarks, exact resume after a kill, bad input, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import Interrupted

from medsynapse.cli import main as cli_main
from medsynapse.data.schema import DataError
from medsynapse.data.sources import PAPER_BENCHMARKS, SOURCES
from medsynapse.data.sources.fixtures import write_fixtures
from medsynapse.eval.runner import PREDICTIONS, BenchmarkRun, EvalSettings, evaluate_benchmarks, read_predictions


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_fixtures(tmp_path_factory.mktemp("bench") / "data")


@pytest.fixture(scope="module")
def demo_model(tiny_env, tmp_path_factory):
    """A saved Stage I-shaped model (VLM + prior encoder + P_phi), as the demo writes it."""
    from medsynapse.model.medsynapse import MedSynapseV

    torch.manual_seed(0)
    model = MedSynapseV.build(str(tiny_env.vlm), str(tiny_env.encoder), n_memory=4, width=32, dtype="float32")
    folder = tmp_path_factory.mktemp("stage1")
    model.save_pretrained(folder)
    return folder


def count_generated(monkeypatch) -> list[str]:
    """Record the id of every sample the runner generates an answer for."""
    generated: list[str] = []
    original = BenchmarkRun.answer_chunk

    def counting(self, chunk, device):
        generated.extend(s.id for s in chunk)
        return original(self, chunk, device)

    monkeypatch.setattr(BenchmarkRun, "answer_chunk", counting)
    return generated


def without_efficiency(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "efficiency"}


def test_eval_cli_writes_a_complete_summary_for_all_seven_benchmarks(demo_model, tiny_env, data_root, tmp_path):
    out = tmp_path / "stage1"
    assert cli_main(["eval", "--model", str(demo_model), "--benchmarks", ",".join(PAPER_BENCHMARKS),
                     "--data-root", str(data_root), "--output", str(out), "--batch-size", "2",
                     "--max-new-tokens", "4"]) == 0
    header, row = (out / "summary.csv").read_text().splitlines()
    columns = header.split(",")
    assert columns == ["model"] + [SOURCES[b].label for b in PAPER_BENCHMARKS] + ["Avg", "ms_per_sample",
                                                                                   "peak_mem_mb"]
    cells = row.split(",")
    assert all(c != "—" for c in cells), row
    assert (out / "summary.png").stat().st_size > 0 and "| VQA-RAD |" in (out / "summary.md").read_text()
    for name in PAPER_BENCHMARKS:
        metrics = json.loads((out / name / "metrics.json").read_text())
        lines = read_predictions(out / name / PREDICTIONS)
        assert metrics["n"] == len(lines) == len({line["id"] for line in lines}) > 0
        assert metrics["correct"] == sum(line["correct"] for line in lines)
        assert metrics["unparseable"] == sum(line["extracted"] is None for line in lines)
        assert metrics["closed_definition"] and metrics["efficiency"]["ms_per_sample"] > 0
        efficiency = metrics["efficiency"]  # how it was measured, read by the study's and summary's tables
        assert (efficiency["processes"], efficiency["batch_size"], efficiency["device"]) == (1, 2, "cpu")
        assert {"id", "prompt", "raw", "extracted", "gold", "correct"} <= set(lines[0])
    # the plain base VLM folder is accepted too, and eval-summary puts both rows in one table
    base_out = tmp_path / "base"
    evaluate_benchmarks(str(tiny_env.vlm), ["vqa-rad", "pmc-vqa"], data_root, base_out,
                        EvalSettings(batch_size=4, max_new_tokens=4))
    combined = tmp_path / "combined"
    assert cli_main(["eval-summary", f"base={base_out}", f"stage1={out}", "--output", str(combined)]) == 0
    rows = (combined / "summary.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["base", "stage1"]
    assert rows[1].split(",")[3] == "—"  # base has no PathVQA result


def test_interrupted_eval_resumes_to_the_same_metrics_without_regenerating(demo_model, data_root, tmp_path,
                                                                          monkeypatch):
    names = ["medxpertqa-mm", "mmmu-med"]
    settings = EvalSettings(batch_size=1, max_new_tokens=4)
    reference = evaluate_benchmarks(str(demo_model), names, data_root, tmp_path / "full", settings)

    generated = count_generated(monkeypatch)

    def kill_after_first_mmmu_batch(name: str, index: int) -> None:
        if name == "mmmu-med" and index == 0:
            raise Interrupted

    with pytest.raises(Interrupted):
        evaluate_benchmarks(str(demo_model), names, data_root, tmp_path / "resumed", settings,
                            on_batch=kill_after_first_mmmu_batch)
    first_run = list(generated)
    assert first_run == ["MM-0", "MM-1", "MM-2", "validation_Clinical_Medicine_1"]
    # a torn line from a kill mid-write is cut off and that sample generated again
    with (tmp_path / "resumed" / "mmmu-med" / PREDICTIONS).open("a") as handle:
        handle.write('{"id": "validation_Clinical_Medicine_2", "raw": "tru')
    generated.clear()
    resumed = evaluate_benchmarks(str(demo_model), names, data_root, tmp_path / "resumed", settings)
    assert generated == ["validation_Clinical_Medicine_2", "validation_Pharmacy_3"]  # nothing finished is redone
    for name in names:
        assert without_efficiency(resumed[name]) == without_efficiency(reference[name])
        full = read_predictions(tmp_path / "full" / name / PREDICTIONS)
        again = read_predictions(tmp_path / "resumed" / name / PREDICTIONS)
        assert [(p["id"], p["raw"]) for p in again] == [(p["id"], p["raw"]) for p in full]


def test_resume_with_other_settings_is_refused_but_a_larger_limit_extends(demo_model, data_root, tmp_path):
    first = evaluate_benchmarks(str(demo_model), ["pmc-vqa"], data_root, tmp_path,
                                EvalSettings(max_new_tokens=4, limit=1))["pmc-vqa"]
    assert first["n"] == 1
    evaluate_benchmarks(str(demo_model), ["pmc-vqa"], data_root, tmp_path, EvalSettings(max_new_tokens=4))
    assert len(read_predictions(tmp_path / "pmc-vqa" / PREDICTIONS)) == 2
    with pytest.raises(ValueError, match="max_new_tokens differ"):
        evaluate_benchmarks(str(demo_model), ["pmc-vqa"], data_root, tmp_path, EvalSettings(max_new_tokens=8))


def test_corrupt_image_stops_with_a_clear_error_or_is_skipped_and_listed(demo_model, tmp_path):
    root = write_fixtures(tmp_path / "data")
    (root / "pmc_vqa" / "figures" / "PMC1064097_F2.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"PMC1064097_F2\.jpg: corrupt or unreadable image \(record id 'pmc-vqa-1', "
                                        r"field 'images'\)"):
        evaluate_benchmarks(str(demo_model), ["pmc-vqa"], root, tmp_path / "strict", EvalSettings(max_new_tokens=4))
    metrics = evaluate_benchmarks(str(demo_model), ["pmc-vqa", "slake"], root, tmp_path / "lenient",
                                  EvalSettings(max_new_tokens=4, skip_bad=True))
    assert metrics["pmc-vqa"]["n"] == 1 and metrics["pmc-vqa"]["n_skipped"] == 1
    assert metrics["pmc-vqa"]["skipped"][0]["id"] == "pmc-vqa-1"
    # once the image is fixed, the skipped id is answered on the next run (and counted once)
    (root / "pmc_vqa" / "figures" / "PMC1064097_F2.jpg").write_bytes(
        (root / "pmc_vqa" / "images" / "PMC1064097_F1.jpg").read_bytes())
    fixed = evaluate_benchmarks(str(demo_model), ["pmc-vqa"], root, tmp_path / "lenient",
                                EvalSettings(max_new_tokens=4, skip_bad=True))["pmc-vqa"]
    assert fixed["n"] == 2 and fixed["n_skipped"] == 0
    # a malformed record is skipped at load time and listed the same way
    path = root / "slake" / "test.json"
    records = json.loads(path.read_text())
    del records[1]["question"]
    path.write_text(json.dumps(records))
    metrics = evaluate_benchmarks(str(demo_model), ["slake"], root, tmp_path / "lenient2",
                                  EvalSettings(max_new_tokens=4, skip_bad=True))
    assert metrics["slake"]["n"] == 1 and "missing field 'question'" in metrics["slake"]["skipped"][0]["error"]


def test_unscorable_split_is_generated_but_not_scored(demo_model, data_root, tmp_path):
    settings = EvalSettings(max_new_tokens=4, source_options={"gmai-mmbench": {"split": "test"}})
    metrics = evaluate_benchmarks(str(demo_model), ["gmai-mmbench"], data_root, tmp_path, settings)["gmai-mmbench"]
    assert metrics["scorable"] is False and metrics["accuracy"] is None and metrics["n"] == 2
    assert "| — |" in (tmp_path / "summary.md").read_text()


def test_parts_left_by_a_killed_multi_process_run_are_merged_and_completed(demo_model, data_root, tmp_path,
                                                                             monkeypatch):
    settings = EvalSettings(batch_size=1, max_new_tokens=4)
    reference = evaluate_benchmarks(str(demo_model), ["medxpertqa-mm"], data_root, tmp_path, settings)
    folder = tmp_path / "medxpertqa-mm"
    lines = (folder / PREDICTIONS).read_text().splitlines(keepends=True)
    (folder / "predictions.part0.jsonl").write_text(lines[0])  # rank 0 was killed before its second batch (MM-2)
    (folder / "predictions.part1.jsonl").write_text(lines[1])
    (folder / PREDICTIONS).unlink()
    generated = count_generated(monkeypatch)
    again = evaluate_benchmarks(str(demo_model), ["medxpertqa-mm"], data_root, tmp_path, settings)
    assert generated == ["MM-2"]
    assert [json.loads(x)["raw"] for x in (folder / PREDICTIONS).read_text().splitlines()] == [
        json.loads(x)["raw"] for x in lines]
    assert not list(folder.glob("predictions.part*"))
    assert without_efficiency(again["medxpertqa-mm"]) == without_efficiency(reference["medxpertqa-mm"])


def test_a_protocol_system_message_reaches_the_chat_template(demo_model, data_root, tmp_path):
    from medsynapse.model.medsynapse import MedSynapseV

    model = MedSynapseV.from_pretrained(demo_model)
    text = model.prompts.prompt_text("Q?", 1, system="You are a helpful medical assistant.")
    assert text.startswith("<|im_start|>system\nYou are a helpful medical assistant.<|im_end|>\n<|im_start|>user\n")
    assert not model.prompts.prompt_text("Q?", 1).startswith("<|im_start|>system")
    evaluate_benchmarks(str(demo_model), ["medxpertqa-mm"], data_root, tmp_path, EvalSettings(max_new_tokens=2))
    line = read_predictions(tmp_path / "medxpertqa-mm" / PREDICTIONS)[0]
    assert line["system"] == "You are a helpful medical assistant."


# A scripted model: the raw output for every fixture question, and what each must score.
SCRIPT = {
    "vqa-rad-2": ("Yes.", True), "vqa-rad-4": ("two", True),  # gold "2": a number word is the same answer
    "slake-11938": ("yes", False), "slake-11940": ("The lung.", True),
    "pathvqa-test-0": ("no", False), "pathvqa-test-2": ("I cannot tell", None),  # None: unparseable, scores 0
    "pmc-vqa-0": ("<answer>B</answer>", True), "pmc-vqa-1": ("A", False),
    "validation_Clinical_Medicine_1": ("Pneumothorax", True), "validation_Clinical_Medicine_2": ("A", False),
    "validation_Pharmacy_3": ("The answer is 2.", True),
    "MM-0": ("A", True), "MM-1": ("D", True), "MM-2": ("C", False),
    "gmai-0": ("B", True), "gmai-1": ("A or B", None),
}


def scripted_model(monkeypatch) -> None:
    """Replace generation (only generation: loading, encoding, scoring and metrics run as they are) by SCRIPT."""
    from medsynapse.model.medsynapse import MedSynapseV

    current: list = []
    original = BenchmarkRun.answer_chunk

    def remember(self, chunk, device):
        current[:] = chunk
        return original(self, chunk, device)

    def answer_encoded(self, items, images, max_new_tokens, branch=None):
        assert len(items) == len(current)
        return [SCRIPT[sample.id][0] for sample in current]

    monkeypatch.setattr(BenchmarkRun, "answer_chunk", remember)
    monkeypatch.setattr(MedSynapseV, "answer_encoded", answer_encoded)


def test_scripted_answers_give_the_known_accuracy_breakdowns_and_average(demo_model, data_root, tmp_path,
                                                                         monkeypatch):
    scripted_model(monkeypatch)
    out = tmp_path / "scripted"
    metrics = evaluate_benchmarks(str(demo_model), list(PAPER_BENCHMARKS), data_root, out,
                                  EvalSettings(batch_size=2, max_new_tokens=4))
    expected_accuracy = {"vqa-rad": 1.0, "slake": 0.5, "pathvqa": 0.0, "pmc-vqa": 0.5, "mmmu-med": 2 / 3,
                         "medxpertqa-mm": 2 / 3, "gmai-mmbench": 0.5}
    for name, accuracy in expected_accuracy.items():
        lines = {line["id"]: line for line in read_predictions(out / name / PREDICTIONS)}
        for sample_id, line in lines.items():
            assert line["correct"] is bool(SCRIPT[sample_id][1]), (sample_id, line)
        assert metrics[name]["accuracy"] == pytest.approx(accuracy, abs=1e-12), name
        assert metrics[name]["unparseable"] == sum(SCRIPT[i][1] is None for i in lines), name
    assert metrics["vqa-rad"]["by_question_type"] == {"COUNT": {"accuracy": 1.0, "n": 1},
                                                      "PRES": {"accuracy": 1.0, "n": 1}}
    assert metrics["slake"]["by_question_type"] == {"Abnormality": {"accuracy": 1.0, "n": 1},
                                                    "Organ": {"accuracy": 0.0, "n": 1}}
    assert metrics["medxpertqa-mm"]["by_group"]["body_system"] == {
        "Reproductive": {"accuracy": 1.0, "n": 1}, "Respiratory": {"accuracy": 0.0, "n": 1},
        "Skeletal": {"accuracy": 1.0, "n": 1}}
    assert metrics["gmai-mmbench"]["by_modality"] == {"Fundus Photography": {"accuracy": 0.5, "n": 2}}
    header, row = (out / "summary.csv").read_text().splitlines()
    cells = dict(zip(header.split(","), row.split(",")))
    average = 100 * sum(expected_accuracy.values()) / len(expected_accuracy)  # 54.76...
    assert cells["Avg"] == f"{average:.1f}" == "54.8"
    assert cells["VQA-RAD"] == "100.0" and cells["PathVQA"] == "0.0"


@pytest.mark.slow
def test_efficiency_is_measured_in_a_fresh_process_and_reads_cuda_memory_in_mib(demo_model, tiny_env, monkeypatch):
    from medsynapse.data.schema import read_samples
    from medsynapse.eval import efficiency

    samples = read_samples(tiny_env.test_file)[:2]
    fresh = efficiency.measure_isolated(str(demo_model), str(tiny_env.test_file), [s.id for s in samples],
                                        n_timed=1, warmup=1, max_new_tokens=2)
    assert fresh["ms_per_sample"] > 0 and fresh["n_timed"] == 1 and fresh["max_new_tokens"] == 2
    assert fresh["memory_measure"] == "cpu_peak_rss_delta" and fresh["peak_mem_mb"] > 0

    class Answers:  # stands for a model on a GPU: what `measure` asks of it
        def answer(self, images, prompts, **kwargs):
            return ["yes"]

    for name, value in {"is_available": lambda: True, "reset_peak_memory_stats": lambda: None,
                        "synchronize": lambda: None, "max_memory_allocated": lambda: 3 * 2**20 + 2**19}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    on_gpu = efficiency.measure(Answers, samples, n_timed=1, warmup=1)
    assert on_gpu["peak_mem_mb"] == 3.5 and on_gpu["memory_measure"] == "cuda_max_allocated"
