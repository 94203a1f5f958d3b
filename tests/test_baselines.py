"""The no-memory baselines from a run file (SFT, CoT-SFT, GRPO-only), reasoning steps in the data, and the SynthMed
benchmark that scores them with `medsynapse eval`."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from safetensors.torch import load_file

from medsynapse.cli import main
from medsynapse.config import ConfigError
from medsynapse.data.schema import DataError, read_samples, sample_from_record
from medsynapse.runconfig import read_run_config, resolve, resolve_baseline


def _run_file(tiny_env, tmp_path, **extra) -> str:
    run = {"output": str(tmp_path / "run"),
           "model": {"vlm": str(tiny_env.vlm), "encoder": str(tiny_env.encoder), "n_memory": 4, "sampler_width": 32,
                     "lora_r": 4, "lora_alpha": 8},
           "data": {"stage1_file": str(tiny_env.train_file)},
           "stage1": {"max_steps": 3, "batch_size": 4, "lr": 5e-3, "answer_types": ["yes_no", "open"],
                      "save_every": 1},
           "stage2": {"max_steps": 2, "batch_size": 2, "group_size": 2, "max_new_tokens": 3, "lambda_causal": 0.5},
           **extra}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    return str(path)


def test_baselines_take_the_budget_of_the_stage_that_shares_their_objective(tiny_env, tmp_path, capsys):
    run = read_run_config(_run_file(tiny_env, tmp_path, baselines={"cot-sft": {"lr": 1e-4}}))
    s1, s2 = resolve(run, "stage1"), resolve(run, "stage2")
    sft, cot, grpo = (resolve_baseline(run, m) for m in ("sft", "cot-sft", "grpo"))
    for config in (sft, cot):
        assert (config.model, config.train_file, config.max_steps, config.batch_size) == \
            (str(tiny_env.vlm), s1.train_file, 3, 4)
        assert (config.lora_r, config.lora_alpha, config.answer_types) == (4, 8, ["yes_no", "open"])
    assert (sft.target, sft.lr, cot.target, cot.lr) == ("answer", 5e-3, "rationale", 1e-4)  # the override wins
    assert sft.output_dir.endswith("run/sft") and cot.output_dir.endswith("run/cot_sft")
    # GRPO-only: Stage II exactly, on the plain VLM, without memory or causal term
    differs = {k for k, v in dataclasses.asdict(grpo).items() if dataclasses.asdict(s2)[k] != v}
    assert differs == {"model", "output_dir", "use_memory", "lambda_causal"}
    assert (grpo.model, grpo.use_memory, grpo.lambda_causal) == (str(tiny_env.vlm), False, 0.0)
    with pytest.raises(ConfigError, match=r"baselines: unknown method\(s\) \['cot'\]"):
        read_run_config(_run_file(tiny_env, tmp_path, baselines={"cot": {}}))
    with pytest.raises(ConfigError, match=r"baselines\.sft: unknown key\(s\) \['lrr'\]"):
        resolve_baseline(read_run_config(_run_file(tiny_env, tmp_path, baselines={"sft": {"lrr": 1}})), "sft")
    assert main(["config", "show", _run_file(tiny_env, tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["baselines"]["cot-sft"]["target"] == "rationale"


def test_synthmed_questions_carry_their_reasoning_steps(tiny_env):
    samples = read_samples(tiny_env.train_file)
    lesion = [s for s in samples if s.family == "lesion" and s.answer_type != "caption"]
    assert lesion and all(s.rationale for s in lesion)
    for sample in lesion:
        assert sample.rationale[0].startswith(f"A {sample.modality} image of the ")
        if sample.question_type == "presence":  # the finding step says what the answer says
            assert ("There is no lesion." in sample.rationale) == (sample.answer == "no")


def test_a_bad_rationale_is_refused_naming_the_field():
    record = {"id": "x", "images": ["a.png"], "question": "q", "answer": "yes", "answer_type": "yes_no"}
    assert sample_from_record({**record, "rationale": ["step one."]}, "f.jsonl", 3).rationale == ["step one."]
    for bad in (["ok", ""], [1], "one step"):
        with pytest.raises(DataError, match=r"f.jsonl, record 3 \(id 'x'\): field 'rationale'"):
            sample_from_record({**record, "rationale": bad}, "f.jsonl", 3)


@pytest.mark.slow
def test_cot_sft_learns_steps_then_the_tagged_answer_and_replies_in_that_format(tiny_env, tmp_path, capsys):
    from medsynapse.answers import REASONING_INSTRUCTION, reasoning_target
    from medsynapse.data.dataset import training_dataset
    from medsynapse.model.medsynapse import MedSynapseV

    base = MedSynapseV.from_pretrained(str(tiny_env.vlm))
    data = training_dataset(str(tiny_env.train_file), base.prompts, [], ["yes_no"], with_answers=True,
                            answer_format="reasoning", target="rationale")
    sample = data.samples[0]
    original = next(s for s in read_samples(tiny_env.train_file) if s.id == sample.id)
    assert sample.answer == reasoning_target(original.rationale, original.answer)
    assert sample.answer.endswith(f"<answer>{original.answer}</answer>") and REASONING_INSTRUCTION in sample.prompt
    learnt = base.prompts.tokenizer.decode(data.encoded(0).answer_ids[:-1])  # the supervised tokens, EOS aside
    assert learnt.replace(" ", "") == sample.answer.replace(" ", "")

    path = _run_file(tiny_env, tmp_path)
    assert main(["train", "baseline", "--method", "cot-sft", "--config", path]) == 0
    folder = tmp_path / "run" / "cot_sft"
    assert json.loads((folder / "medsynapse.json").read_text())["answer_format"] == "reasoning"
    adapter = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    assert any(float(v.abs().max()) > 1e-4 for k, v in adapter.items() if "lora_B" in k)  # it trained
    # eval reads the format from the folder: reasoning prompts, the tag scored, the reasoning budget
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(folder), "--benchmarks", "synthmed", "--path",
                 f"synthmed={tiny_env.test_file.parent}", "--output", str(out), "--limit", "2",
                 "--max-new-tokens", "4"]) == 0
    run_info = json.loads((out / "synthmed" / "run.json").read_text())
    assert run_info["answer_format"] == "reasoning"


def test_a_cot_run_without_steps_is_refused_with_a_sample_named(tiny_env, tmp_path):
    from medsynapse.data.dataset import training_dataset
    from medsynapse.model.medsynapse import MedSynapseV

    records = [json.loads(line) for line in tiny_env.train_file.read_text().splitlines()]
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({**r, "rationale": [],
                                        "images": [str(tiny_env.train_file.parent / p) for p in r["images"]],
                                        "mask": None}) + "\n" for r in records))
    base = MedSynapseV.from_pretrained(str(tiny_env.vlm))
    with pytest.raises(ValueError, match=r"bare.jsonl: \d+ sample\(s\) have no 'rationale' \(e.g. id '.+'\)"):
        training_dataset(str(bare), base.prompts, [], [], with_answers=True, target="rationale")


def test_the_synthmed_benchmark_is_the_demos_held_out_lesion_questions(tiny_env, tmp_path):
    from medsynapse.data.sources import load_source

    bench = load_source("synthmed", tiny_env.test_file.parent, tmp_path / "img")
    every = read_samples(tiny_env.test_file)
    expected = [s.id for s in every if s.family == "lesion" and s.answer_type != "caption"]
    assert [s.id for s in bench.samples] == expected and bench.n_records == len(every)
    assert sum(bench.excluded.values()) == len(every) - len(expected)
    assert bench.max_new_tokens == 8


def test_pubmedvision_answers_become_steps_when_asked(tmp_path):
    from medsynapse.data.sources import load_source
    from medsynapse.data.sources.fixtures import write_fixtures
    from medsynapse.data.sources.pubmedvision import sentence_steps

    assert sentence_steps("A mass. It is 3.5 cm wide. Likely benign.") == (["A mass.", "It is 3.5 cm wide."],
                                                                         "Likely benign.")
    assert sentence_steps("One sentence.") == ([], "One sentence.")
    root = write_fixtures(tmp_path / "data")
    plain = load_source("pubmedvision", root, tmp_path / "img").samples
    split = load_source("pubmedvision", root, tmp_path / "img", rationale="sentences").samples
    for a, b in zip(plain, split):
        assert (b.rationale, b.answer) == sentence_steps(a.answer) and not a.rationale
    with pytest.raises(ValueError, match="option rationale 'words'"):
        load_source("pubmedvision", root, tmp_path / "img", rationale="words")


def test_grpo_only_baseline_trains_a_lora_without_memory(tiny_env, tmp_path):
    assert main(["train", "baseline", "--method", "grpo", "--config", _run_file(tiny_env, tmp_path)]) == 0
    folder = tmp_path / "run" / "grpo_only"
    manifest = json.loads((folder / "medsynapse.json").read_text())
    assert manifest["sampler"] is None and manifest["adapter"] and not (folder / "sampler.safetensors").exists()
    with pytest.raises(SystemExit, match="--method must be one of sft, cot-sft, grpo, coconut, mcout, ivt-lr"):
        main(["train", "baseline", "--method", "cot", "--config", _run_file(tiny_env, tmp_path)])
