"""One config file per run: the shipped paper configs hold the paper's values under the recipes' names, `config
show` prints them resolved, stage sections are strict, and `train stageN` chains the stages from one file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medsynapse.cli import main
from medsynapse.config import ConfigError
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.recipes.stage1_warmup import Stage1Config
from medsynapse.recipes.stage2_ccr import Stage2Config
from medsynapse.recipes.stage3_imt import Stage3Config
from medsynapse.runconfig import is_run_config, read_run_config, resolve, run_config_from

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["medsynapse-v-8b.yaml", "medsynapse-v-4b.yaml"])
def test_paper_configs_hold_the_values_the_paper_states(name):
    run = read_run_config(CONFIGS / name)
    s1, s2, s3 = (resolve(run, s) for s in ("stage1", "stage2", "stage3"))
    assert isinstance(s1, Stage1Config) and isinstance(s2, Stage2Config) and isinstance(s3, Stage3Config)
    # Stage I: lr 2e-4, 3 epochs, N = 16, P_phi only (a 2-layer sampler)
    assert (s1.lr, s1.epochs, s1.max_steps, s1.n_memory, s1.sampler_layers) == (2e-4, 3.0, 0, 16, 2)
    # Stage II: LoRA r 64 on the attention projections, G 4, eps 0.2, lambdas 1.0 / 0.5, 200 steps,
    # rollout batch 32 trajectories, max generation 1024, the paper's Eq. 5 with the zeroed region
    assert s2.lora_r == 64 and set(s2.lora_targets) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert (s2.group_size, s2.epsilon, s2.lambda_acc, s2.lambda_causal, s2.max_steps) == (4, 0.2, 1.0, 0.5, 200)
    assert s2.batch_size * s2.group_size == 32 and s2.max_new_tokens == 1024
    assert (s2.causal_form, s2.causal_reduction, s2.intervention) == ("paper", "sum", "zero")
    # reasoning-length rollouts: an analysis, then the final answer the reward reads (our reading of the paper)
    assert s2.answer_format == s3.answer_format == "reasoning" and run.eval.answer_format is None  # scored as trained
    # Stage III: JSD beta 0.5, lr 1e-4, 3 epochs, one on-policy trajectory per sample per step, JSD only
    assert (s3.beta, s3.lr, s3.epochs, s3.max_steps, s3.memory_alignment) == (0.5, 1e-4, 3.0, 0, 0.0)
    # the folders chain, and Stages II-III read the RL data
    assert s2.model == s1.output_dir and s3.model == s2.output_dir
    assert s2.train_file == s3.train_file != s1.train_file
    # the paper's data: 50K PubMedVision pairs (Stage I); 3K OmniMedVQA + 1K SLAKE/PathVQA open (Stages II-III)
    assert [(c.name, c.size) for c in run.data.stage1_corpora] == [("pubmedvision", 50000)]
    corpora = {c.name: c.size for c in run.data.stage2_corpora}
    assert corpora["omnimedvqa"] == 3000 and corpora["slake-open-train"] + corpora["pathvqa-open-train"] == 1000
    assert run.eval.benchmarks == ["vqa-rad", "slake", "pathvqa", "pmc-vqa", "mmmu-med", "medxpertqa-mm",
                                   "gmai-mmbench"]


def test_config_show_prints_every_stage_resolved_with_defaults(capsys):
    assert main(["config", "show", str(CONFIGS / "medsynapse-v-8b.yaml"), "--set", "stage2.lr=3e-5",
                 "model.lora_r=8"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {"model", "data", "eval", "stage1", "stage2", "stage3"} <= set(shown)
    assert shown["stage2"]["lr"] == 3e-5 and shown["stage2"]["lora_r"] == 8  # overrides reach the recipes' names
    assert shown["stage2"]["num_iterations"] == Stage2Config().num_iterations  # a default the file does not set
    assert shown["stage1"]["vlm"] == "/models/Qwen3-VL-8B-Instruct"
    assert shown["stage3"]["output_dir"] == "runs/medsynapse-v-8b/stage3_student"


def test_stage_sections_are_strict_and_name_the_file_and_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"vlm": "v"}, "stage2": {"lr": 1e-5, "lr_typo": 1}}))
    run = read_run_config(path)
    with pytest.raises(ConfigError, match=r"run\.yaml\.stage2: unknown key\(s\) \['lr_typo'\]"):
        resolve(run, "stage2")
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['stage4'\]"):
        run_config_from({"model": {}, "stage4": {}}, "x.yaml")
    with pytest.raises(ConfigError, match=r"x\.yaml\.model: unknown key"):
        run_config_from({"model": {"width": 3}}, "x.yaml")
    # a recipe's keys at the top level (the removed flat files) are not a run file: `model` there is a folder path
    assert not is_run_config({"model": "runs/stage1", "lr": 1e-5}) and is_run_config({"model": {"vlm": "v"}})
    assert is_run_config({"baselines": {"sft": {}}})
    flat = tmp_path / "stage2.yaml"
    flat.write_text("model: runs/stage1\nlr: 1.0e-5\n")
    with pytest.raises(ConfigError, match=r"stage2\.yaml: not a run file .* put them under the stage's section"):
        read_run_config(flat)


def test_train_reads_each_stage_of_one_run_file(tiny_env, tmp_path):
    run = {"output": str(tmp_path / "run"),
           "model": {"vlm": str(tiny_env.vlm), "encoder": str(tiny_env.encoder), "n_memory": 4,
                     "sampler_width": 32, "lora_r": 4, "lora_alpha": 8},
           "data": {"stage1_file": str(tiny_env.train_file)},
           "stage1": {"max_steps": 2, "batch_size": 4, "answer_types": ["yes_no"]},
           "stage2": {"max_steps": 1, "batch_size": 2, "group_size": 2, "max_new_tokens": 3},
           "stage3": {"max_steps": 1, "batch_size": 2, "max_new_tokens": 3}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    for stage in ("stage1", "stage2", "stage3"):
        assert main(["train", stage, "--config", str(path)]) == 0
    student = MedSynapseV.from_pretrained(tmp_path / "run" / "stage3_student")
    assert student.autonomous is not None and student.n_memory == 4
    assert MedSynapseV.from_pretrained(tmp_path / "run" / "stage2").has_adapter


def test_a_demo_ablation_is_the_study_row_with_the_same_set_and_the_old_merge():
    """One way to state an ablation: the demo's `stage2_ablations` items are a study row's `set:`; each resolves to
    the study row's stage config and to what the demo's former mapping form gave (same settings: same numbers)."""
    from dataclasses import asdict

    from medsynapse.config import from_dict, read_yaml
    from medsynapse.steps.synthmed import DemoConfig, ablation_config

    path = CONFIGS / "synthmed.yaml"
    raw, run = read_yaml(path), read_run_config(path)
    demo = DemoConfig()
    ablations = [("stage2", name, items) for name, items in demo.stage2_ablations.items()]
    ablations += [("stage3", name, items) for name, items in demo.stage3_ablations.items()]
    assert len(ablations) == 4
    for stage, name, items in ablations:
        variant = ablation_config(run, stage, name, items)
        assert variant == resolve(run_config_from(raw, str(path), items), stage)  # the study's row
        former = {item.split("=")[0].split(".", 1)[1]: yaml.safe_load(item.split("=", 1)[1]) for item in items}
        resolved = resolve(run, stage)
        assert variant == from_dict(type(resolved), {**asdict(resolved), **former})  # the former mapping form
        changed = {k for k, v in asdict(variant).items() if asdict(resolved)[k] != v}
        assert changed == set(former) and changed  # only the named settings move


@pytest.mark.parametrize(("items", "message"), [
    ({"causal_form": "paper"}, "expected a list of stage2.KEY=VALUE (as a study row's `set:`)"),
    (["model.n_memory=4"], "'model.n_memory=4': expected stage2.KEY=VALUE (a variant of stage2 changes only"),
    (["stage3.beta=0.5"], "'stage3.beta=0.5': expected stage2.KEY=VALUE"),
    (["stage2.causal_form"], "expected stage2.KEY=VALUE"),
    (["stage2.no_such_key=1"], "synthmed.stage2_ablations.x: "),
])
def test_a_demo_ablation_in_another_form_or_section_is_one_line_naming_it(items, message):
    from medsynapse.steps.synthmed import ablation_config

    run = read_run_config(CONFIGS / "synthmed.yaml")
    with pytest.raises(ConfigError) as raised:
        ablation_config(run, "stage2", "x", items)
    assert message in str(raised.value) and "synthmed.yaml.synthmed.stage2_ablations.x" in str(raised.value)
    assert "\n" not in str(raised.value)
