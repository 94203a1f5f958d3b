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


@pytest.mark.parametrize(("controls", "ablations"), [(True, False), (False, True), (True, True)])
def test_the_demo_is_the_demo_studys_rows_chosen_by_its_synthmed_section(controls, ablations, tmp_path):
    """One way to state an ablation: the demo's ablations are configs/study-demo.yaml's rows with a `set`, its
    controls the `baseline` rows; each ablation resolves to its stage with only the named settings changed and trains
    from the seed's one earlier unit (a Stage II ablation from the Stage I of stage2's chain)."""
    from dataclasses import asdict

    from medsynapse.study import demo_study, plan_units, row_run

    overrides = [f"synthmed.controls={str(controls).lower()}", f"synthmed.ablations={str(ablations).lower()}",
                 "synthmed.seeds=[0, 2]", f"output={tmp_path / 'demo'}", "synthmed.eval_batch_size=16"]
    study, raw, source = demo_study(CONFIGS / "synthmed.yaml", overrides)
    core = ["base", "stage1", "stage2", "stage3_student"]
    kept = [*core, *(["sft", "grpo_only"] if controls else []),
            *(["stage2_lambda0", "stage2_paper_eq5", "stage2_ranked", "stage3_jsd_only"] if ablations else [])]
    assert sorted(study.rows) == sorted(kept)
    assert (study.seeds, study.output, study.eval_batch_size) == ([0, 2], str(tmp_path / "demo"), 16)
    assert {study.rows[r].group for r in study.rows} == {"demo"}  # one Holm family, as before
    if not ablations:
        return
    plain = {stage: resolve(row_run(raw, source, study.rows[name], 0, None), stage)
             for stage, name in (("stage2", "stage2"), ("stage3", "stage3_student"))}
    chain = {u.kind: u for u in plan_units(row_run(raw, source, study.rows["stage3_student"], 0, None),
                                           study.rows["stage3_student"], 0, tmp_path / "units")}
    for name, stage in (("stage2_lambda0", "stage2"), ("stage2_paper_eq5", "stage2"), ("stage2_ranked", "stage2"),
                        ("stage3_jsd_only", "stage3")):
        row = study.rows[name]
        variant = resolve(row_run(raw, source, row, 0, None), stage)
        named = {item.split("=")[0].split(".", 1)[1]: yaml.safe_load(item.split("=", 1)[1]) for item in row.set}
        changed = {k for k, v in asdict(variant).items() if asdict(plain[stage])[k] != v}
        assert changed == set(named) and changed, name  # only the named settings move
        units = plan_units(row_run(raw, source, row, 0, None), row, 0, tmp_path / "units")
        assert [u.name for u in units[:-1]] == [chain[u.kind].name for u in units[:-1]], name  # the same start
        assert units[-1].name != chain[stage].name, name


def test_a_demo_ablation_that_changes_nothing_or_names_no_key_is_one_line(tmp_path):
    from medsynapse.study import demo_study

    overrides = ["synthmed.ablations=true", f"output={tmp_path / 'demo'}", "stage2.lambda_causal=0.0"]
    with pytest.raises(ConfigError) as raised:  # the run file already says what stage2_lambda0 sets
        demo_study(CONFIGS / "synthmed.yaml", overrides)
    assert "'stage2_lambda0' resolves to the same model as its reference 'stage2'" in str(raised.value)
    with pytest.raises(ConfigError, match=r"synthmed\.yaml\.synthmed: unknown key.*stage2_ablations"):
        demo_study(CONFIGS / "synthmed.yaml", ["synthmed.stage2_ablations={x: [stage2.top_p=0]}"])
