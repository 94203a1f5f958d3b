"""Benchmark and training-corpus loaders on fixtures that mirror the published layouts."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from medsynapse.data.schema import DataError, read_samples
from medsynapse.data.sources import PAPER_BENCHMARKS, load_source
from medsynapse.data.sources.fixtures import write_fixtures
from medsynapse.data.sources.omnimedvqa import normalise_modality


@pytest.fixture()
def root(tmp_path):
    return write_fixtures(tmp_path / "data")


def load(root, name, **kw):
    return load_source(name, root, root.parent / "image-cache", **kw)


def by_id(benchmark):
    return {s.id: s for s in benchmark.samples}


def test_vqa_rad_osf_split_rule_closed_filter_and_cast(root):
    bench = load(root, "vqa-rad")
    assert bench.n_records == 4 and bench.source.endswith("VQA_RAD Dataset Public.json")
    samples = by_id(bench)
    assert sorted(samples) == ["vqa-rad-2", "vqa-rad-4"]  # qid 1 is train, qid 3 is OPEN
    assert bench.excluded == {"train split": 1, "open-ended (answer_type OPEN)": 1}
    assert samples["vqa-rad-2"].answer == "yes" and samples["vqa-rad-2"].answer_type == "yes_no"
    assert samples["vqa-rad-4"].answer == "2" and samples["vqa-rad-4"].answer_type == "open"  # int cast to str
    assert samples["vqa-rad-2"].prompt.endswith("Please output 'yes' or 'no'(no extra output).")
    assert {i: (s.question_type, s.groups["organ"]) for i, s in samples.items()} == {
        "vqa-rad-2": ("PRES", "CHEST"), "vqa-rad-4": ("COUNT", "HEAD")}  # the per-organ breakdown's groups
    assert "answer_type == CLOSED" in bench.closed_definition


def test_vqa_rad_hf_copy_closed_means_yes_no(root):
    shutil.rmtree(root / "vqa_rad")
    bench = load(root, "vqa-rad")
    assert len(bench.samples) == 2 and bench.n_records == 3
    assert [s.answer for s in bench.samples] == ["yes", "no"]
    assert "yes, no" in bench.closed_definition
    assert all(Path(s.images[0]).read_bytes()[:2] == b"\x89P" for s in bench.samples)  # materialised PNG bytes


def test_slake_english_closed_only_with_exact_match_for_choice_answers(root):
    bench = load(root, "slake")
    samples = by_id(bench)
    assert sorted(samples) == ["slake-11938", "slake-11940"]
    assert bench.excluded == {"language not 'en'": 1, "answer_type not CLOSED": 1}
    assert samples["slake-11938"].answer_type == "yes_no" and samples["slake-11938"].answer == "no"
    assert samples["slake-11940"].answer_type == "open" and samples["slake-11940"].answer == "Lung"
    assert samples["slake-11938"].modality == "CT" and samples["slake-11938"].question_type == "Organ"


def test_slake_accepts_validate_json_and_open_train_split(root):
    (root / "slake" / "validation.json").rename(root / "slake" / "validate.json")
    assert len(load(root, "slake", split="validation", answer_type="").samples) == 1
    train = load(root, "slake-open-train")
    assert [s.answer for s in train.samples] == ["Lung"] and train.samples[0].answer_type == "open"


def test_pathvqa_parquet_and_original_pickles_agree(root):
    parquet = load(root, "pathvqa")
    assert [s.answer for s in parquet.samples] == ["yes", "no"] and parquet.n_records == 3
    shutil.rmtree(root / "path_vqa")
    pickled = load(root, "pathvqa")
    assert pickled.source.endswith("test_qa.pkl")
    assert [(s.question, s.answer) for s in pickled.samples] == [(s.question, s.answer) for s in parquet.samples]
    open_train = load(root, "pathvqa", split="test", open_only=True)
    assert [s.answer for s in open_train.samples] == ["neutrophils"]


def test_pathvqa_pickle_with_a_class_is_refused(root):
    shutil.rmtree(root / "path_vqa")

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    (root / "pvqa" / "qas" / "test" / "test_qa.pkl").write_bytes(pickle.dumps([Payload()]))
    with pytest.raises(DataError, match="refusing to unpickle"):
        load(root, "pathvqa")


def test_pmc_vqa_both_answer_spellings_prefix_stripping_and_image_folders(root):
    for file in ("test_clean.csv", "test.csv"):
        bench = load(root, "pmc-vqa", file=file)
        first, second = bench.samples
        assert first.options == {"A": "Diffuse uptake pattern", "B": "Focal uptake pattern",
                                  "C": "No uptake pattern", "D": "Cannot determine from the information given"}
        assert (first.answer, second.answer) == ("B", "D")
        assert "/images/" in first.images[0] and "/figures/" in second.images[0]
        assert first.prompt.endswith("Answer with the option's letter from the given choices directly.")


def test_pmc_vqa_without_label_uses_answer_text(root):
    path = root / "pmc_vqa" / "test.csv"
    lines = path.read_text().splitlines()
    lines = [line.rsplit(",", 1)[0] for line in lines]  # drop Answer_label
    path.write_text("\n".join(lines) + "\n")
    assert [s.answer for s in load(root, "pmc-vqa", file="test.csv").samples] == ["B", "D"]


def test_mmmu_options_literal_image_tags_multi_image_and_open(root):
    bench = load(root, "mmmu-med")
    samples = by_id(bench)
    assert len(samples) == 3 and "subjects not found" in bench.closed_definition
    first = samples["validation_Clinical_Medicine_1"]
    assert first.options == {"A": "Pneumonia", "B": "Effusion", "C": "Pneumothorax", "D": "Normal"}
    assert first.answer == "C" and first.question.startswith("[image 1] ")
    assert "(C) Pneumothorax" in first.prompt and len(first.images) == 1
    second = samples["validation_Clinical_Medicine_2"]
    assert len(second.images) == 2 and second.options == {"A": "[image 1]", "B": "[image 2]"}  # image options
    assert "<image" not in second.prompt
    pharmacy = samples["validation_Pharmacy_3"]
    assert pharmacy.answer_type == "mmmu_open" and pharmacy.answer == "2" and pharmacy.options == {}


def test_medxpertqa_multi_image_no_duplicated_options(root):
    bench = load(root, "medxpertqa-mm")
    samples = by_id(bench)
    assert len(samples) == 3 and len(samples["MM-0"].images) == 2
    mm1 = samples["MM-1"]
    assert mm1.answer == "D" and mm1.options["D"] == "Superior"
    assert mm1.prompt.count("(D) Superior") == 1 and mm1.prompt.count("Superior") == 1
    assert mm1.prompt.endswith("Among A through E, the answer is")
    assert mm1.system == "You are a helpful medical assistant."
    assert {s.question_type for s in samples.values()} == {"Reasoning", "Understanding"}


def test_gmai_back_referenced_image_options_and_unscorable_test(root):
    bench = load(root, "gmai-mmbench")
    first, second = bench.samples
    assert first.images == second.images  # row 1 reuses row 0's image
    assert list(first.options) == ["A", "B", "C", "D"] and first.answer == "B"
    assert list(second.options) == list("ABCDE") and second.answer == "E"
    assert first.groups["department"] == "Ophthalmology" and first.question_type == "Disease Diagnosis"
    assert first.prompt.startswith("Question: ") and "Please select the correct answer" in first.prompt
    test = load(root, "gmai-mmbench", split="test")
    assert not test.scorable and len(test.samples) == 2 and test.samples[0].answer == ""


def test_hgv_bundle_text_to_letter_and_exclusions(root):
    bench = load(root, "hgv-bundle")
    assert [s.answer for s in bench.samples] == ["B", "B"]
    assert bench.samples[1].options == {"A": "Pneumonia", "B": "Effusion", "C": "Normal"}
    assert bench.excluded == {"question_type == 'open'": 1, "no gold answer ('?')": 1}
    assert bench.samples[0].groups["dataset"] == "VQA-RAD_test"


def test_omnimedvqa_modality_normalisation_leading_slash_and_balance(root):
    every = load(root, "omnimedvqa")  # not balanced by default: every question of the eight modalities
    assert every.n_records == 3 and sorted(s.modality for s in every.samples) == ["CT", "Fundus", "Fundus"]
    assert "balancing" not in every.excluded and "not balanced" in every.closed_definition
    bench = load(root, "omnimedvqa", balance=True)
    modalities = sorted(s.modality for s in bench.samples)
    assert modalities == ["CT", "Fundus"]  # balanced: one per modality (CT has only one)
    assert bench.excluded["balancing"] == 1
    full = load(root, "omnimedvqa", balance=True, per_modality=10)
    assert len(full.samples) == 2  # capped by the rarest modality
    with pytest.raises(DataError, match="per_modality only applies"):
        load(root, "omnimedvqa", per_modality=10)
    ct = next(s for s in bench.samples if s.modality == "CT")
    assert ct.answer == "A" and ct.images[0].endswith("000108.png")
    assert ct.groups["raw_modality"] == "CT(Computed Tomography)"


@pytest.mark.parametrize("raw, expected", [
    ("CT(Computed Tomography)", "CT"), ("MR (Mag-netic Resonance Imaging)", "MRI"), ("X-Ray", "X-Ray"),
    ("Microscopy Images", "Microscopy"), ("OCT (Optical Coherence Tomography)", "OCT"),
    ("Fundus Photography", "Fundus"), ("Dermoscopy", "Dermoscopy"), ("Ultrasound", "Ultrasound"),
    ("Endoscopy", ""), ("Digital Photography", "")])
def test_modality_names_normalise_onto_the_eight(raw, expected):
    assert normalise_modality(raw) == expected


def test_pubmedvision_multi_image_and_image_tokens_removed(root):
    bench = load(root, "pubmedvision")
    first, second, follow_up = bench.samples
    assert first.answer_type == "caption" and first.answer.startswith("Axial CT")
    assert len(second.images) == 2 and second.question == "What is shown?"
    # every question-answer pair of a multi-turn record, the later ones with the earlier as context
    assert follow_up.id == "pmc_demo_2-turn2" and follow_up.answer == "No, they are non-caseating."
    assert follow_up.question == ("Earlier in this conversation:\nQ: What is shown?\nA: H&E stain showing "
                                  "granulomas.\n\nAre they caseating?") and follow_up.images == second.images
    assert len(load(root, "pubmedvision", modalities=("tomography",)).samples) == 1


@pytest.mark.parametrize("name", PAPER_BENCHMARKS)
def test_every_paper_benchmark_loads_from_the_fixtures(root, name):
    bench = load(root, name)
    assert bench.samples and bench.closed_definition
    for sample in bench.samples:
        assert sample.images and all(p for p in sample.images)


def test_missing_field_names_file_record_and_field(root):
    path = root / "slake" / "test.json"
    records = json.loads(path.read_text())
    del records[1]["answer"]
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"test\.json, record 2 \(qid 11938\): missing field 'answer'"):
        load(root, "slake")
    bench = load(root, "slake", skip_bad=True)
    assert [s.id for s in bench.samples] == ["slake-11940"]
    assert bench.skipped[0]["id"] == "11938" and "missing field 'answer'" in bench.skipped[0]["error"]


def test_missing_image_names_the_record_and_field(root):
    (root / "medxpertqa" / "images" / "MM-0-b.jpeg").unlink()
    with pytest.raises(DataError, match=r"record 1 \(id 'MM-0'\): field 'images': image not found"):
        load(root, "medxpertqa-mm")
    assert [s.id for s in load(root, "medxpertqa-mm", skip_bad=True).samples] == ["MM-1", "MM-2"]


def test_bad_base64_and_missing_dataset_are_clear_errors(root, tmp_path):
    path = root / "gmai" / "GMAI-MMBench_VAL.tsv"
    lines = path.read_text().splitlines()
    cells = lines[1].split("\t")
    cells[8] = "!!!" + "x" * 80
    lines[1] = "\t".join(cells)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"index '0'\): field 'image' is not valid base64"):
        load(root, "gmai-mmbench")
    with pytest.raises(DataError, match="no PMC-VQA|PMC-VQA file not found"):
        load_source("pmc-vqa", tmp_path / "empty", tmp_path / "cache")


def test_convert_writes_a_training_file_the_recipes_read(root, tmp_path):
    from medsynapse.cli import main as cli_main

    for source, answer_type in (("omnimedvqa", "multiple_choice"), ("pathvqa-open-train", "open"),
                                ("pubmedvision", "caption")):
        out = tmp_path / source / "train.jsonl"
        assert cli_main(["convert", "--source", source, "--data-root", str(root), "--out", str(out)]) == 0
        samples = read_samples(out)
        assert samples and {s.answer_type for s in samples} == {answer_type}
        assert all(Path(p).is_file() for s in samples for p in s.images)


def test_layout_option_picks_the_hf_copy_when_both_exist(root):
    assert load(root, "vqa-rad", layout="hf").source.endswith(".parquet")
    with pytest.raises(ValueError, match="layout"):
        load(root, "vqa-rad", layout="xml")


def test_parquet_shards_of_one_split_are_all_read(root):
    import pyarrow.parquet as pq

    folder = root / "path_vqa" / "data"
    table = pq.read_table(folder / "test-00000-of-00001.parquet")
    (folder / "test-00000-of-00001.parquet").unlink()
    pq.write_table(table.slice(0, 2), folder / "test-00000-of-00002.parquet")
    pq.write_table(table.slice(2), folder / "test-00001-of-00002.parquet")
    bench = load(root, "pathvqa")
    assert bench.n_records == 3 and [s.answer for s in bench.samples] == ["yes", "no"]
    broken = table.slice(2).drop_columns(["question"])  # the second shard's only row loses its question
    pq.write_table(broken, folder / "test-00001-of-00002.parquet")
    with pytest.raises(DataError, match=r"test-00001-of-00002\.parquet, record 1: missing field 'question'"):
        load(root, "pathvqa")  # the shard at fault, counted within it from 1 (was: the first shard, record 2)


def test_duplicate_ids_are_bad_records(root):
    path = root / "slake" / "test.json"
    records = json.loads(path.read_text())
    records.append(dict(records[1]))
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match="duplicate sample id 'slake-11938'"):
        load(root, "slake")
    bench = load(root, "slake", skip_bad=True)
    assert len(bench.samples) == 2 and bench.skipped[0]["id"] == "slake-11938"


def test_a_byte_order_mark_does_not_hide_the_header(root):
    path = root / "pmc_vqa" / "test_clean.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert len(load(root, "pmc-vqa").samples) == 2


@pytest.mark.parametrize(("name", "ours", "published"), [
    ("slake", "slake", "Slake1.0"), ("omnimedvqa", "omnimedvqa", "OmniMedVQA"), ("gmai-mmbench", "gmai", "LMUData"),
    ("mmmu-med", "mmmu", "MMMU"), ("pmc-vqa", "pmc_vqa", "PMC-VQA"), ("vqa-rad", "vqa_rad_hf", "vqa-rad"),
    ("pathvqa", "path_vqa", "path-vqa")])
def test_published_folder_names_and_any_folder_by_path(root, tmp_path, name, ours, published):
    """A benchmark in the folder it is published under is read as is; `folder` (`--path`) reads it from anywhere;
    the same questions either way."""
    other_copy = {"vqa-rad": "vqa_rad", "pathvqa": "pvqa"}.get(name)  # the other layout would be read instead
    if other_copy:
        shutil.rmtree(root / other_copy)
    reference = [(s.question, s.answer) for s in load(root, name).samples]
    assert reference
    (root / ours).rename(root / published)
    assert [(s.question, s.answer) for s in load(root, name).samples] == reference
    elsewhere = tmp_path / "elsewhere" / "copy"
    elsewhere.parent.mkdir()
    (root / published).rename(elsewhere)
    with pytest.raises(DataError):
        load(root, name)  # no longer under the data root
    assert [(s.question, s.answer) for s in load(root, name, folder=str(elsewhere)).samples] == reference
    with pytest.raises(DataError, match="not a folder"):
        load(root, name, folder=str(tmp_path / "missing"))


def test_cli_path_reads_a_benchmark_from_any_folder(root, tmp_path):
    from medsynapse.cli import main

    moved = tmp_path / "Slake1.0"
    (root / "slake").rename(moved)
    out = tmp_path / "slake.jsonl"
    assert main(["convert", "--source", "slake", "--path", str(moved), "--out", str(out)]) == 0
    assert len(read_samples(out)) == len(load(root, "slake", folder=str(moved)).samples) > 0
    with pytest.raises(SystemExit, match="--path 'vqa-rad=/x': expected BENCHMARK=DIR"):
        main(["eval", "--model", "unused", "--benchmarks", "slake", "--path", "vqa-rad=/x", "--output",
              str(tmp_path / "eval")])


def test_a_benchmark_that_filters_nothing_reports_an_empty_exclusion_count_of_its_own():
    from medsynapse.data.sources.common import Benchmark

    first, second = (Benchmark(name, "file.jsonl", "every row", [], 0) for name in ("a", "b"))
    assert first.excluded == {} and first.skipped == []  # a dict for the convert report's JSON, never null
    first.excluded["open"] = 1
    assert second.excluded == {}
