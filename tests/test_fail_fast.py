"""Fail fast (values.py): every value of every stage of a run file is checked before anything trains, by every entry
point (pipeline, study, study --plan, train, train baseline, demo, a stage-only file), with bounds that refuse absurd
sizes and a memory lower bound against the machine's; each refusal is one line naming FILE.section.key, and nothing
is written. The shipped configs pass."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from conftest import run_file

from medsynapse.cli import main
from medsynapse.config import ConfigError
from medsynapse.runconfig import read_run_config
from medsynapse.study import read_study
from medsynapse.values import MEMORY_ENV, check_config, check_run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _run_file(tmp_path: Path) -> Path:
    """A run file whose folders do not exist: the checks read no file, and nothing may be built from it."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "output": str(tmp_path / "out"),
        "model": {"vlm": str(tmp_path / "no_vlm"), "encoder": str(tmp_path / "no_encoder"), "n_memory": 4,
                  "sampler_width": 32, "lora_r": 4, "lora_alpha": 8, "architecture": "qwen3-vl-4b"},
        "data": {"stage1_file": str(tmp_path / "train.jsonl")},
        "stage1": {"max_steps": 2, "batch_size": 4},
        "stage2": {"max_steps": 2, "batch_size": 2, "group_size": 2, "max_new_tokens": 4},
        "stage3": {"max_steps": 2, "batch_size": 2, "max_new_tokens": 4},
        "eval": {"benchmarks": ["synthmed"], "data_root": str(tmp_path / "data")}}))
    return path


# --set items -> the FILE.section.key the one line must name, and the reason
BAD = {
    "nan lr in stage II": (["stage2.lr=.nan"], "run.yaml.stage2.lr: must be a finite number, got nan"),
    "negative lr": (["stage1.lr=-1e-4"], "run.yaml.stage1.lr: must be > 0"),
    "huge n_memory": (["model.n_memory=1000000"], "run.yaml.model.n_memory: must be in [1, 1024], got 1000000"),
    "n_memory in a stage": (["stage1.n_memory=2000"], "run.yaml.stage1.n_memory: must be in [1, 1024]"),
    "huge width": (["model.sampler_width=100000"], "run.yaml.model.sampler_width: must be in [1, 65536]"),
    "huge A_psi width": (["model.autonomous_mlp_hidden=70000"], "run.yaml.model.autonomous_mlp_hidden: must be in"),
    "heads that do not divide": (["model.sampler_heads=3"], "run.yaml.model.sampler_heads: 3 heads do not divide"),
    "lora rank": (["model.lora_r=0"], "run.yaml.model.lora_r: must be in [1, 65536], got 0"),
    "sampler layers": (["model.sampler_layers=0"], "run.yaml.model.sampler_layers: must be in [1, 64], got 0"),
    "no LoRA module for the baselines": (["model.lora_targets=[]", "stage2.lora_targets=[q_proj]"],
                                         "run.yaml.model.lora_targets: no module named"),
    "memory off with a causal weight": (["stage2.use_memory=false", "stage2.lambda_causal=0.5"],
                                        "run.yaml.stage2.lambda_causal: use_memory: false has no counterfactual"),
    "top_p above 1": (["stage2.top_p=1.5"], "run.yaml.stage2.top_p: must be in (0, 1], got 1.5"),
    "warm-up ratio": (["stage1.warmup_ratio=-0.1"], "run.yaml.stage1.warmup_ratio: must be in [0, 1]"),
    "JSD beta": (["stage3.beta=1.5"], "run.yaml.stage3.beta: must be in [0, 1], got 1.5"),
    "zero group": (["stage2.group_size=0"], "run.yaml.stage2.group_size: must be in [1, 1024], got 0"),
    "zero stage II steps": (["stage2.max_steps=0"], "run.yaml.stage2.max_steps: must be >= 1"),
    "fractional steps": (["stage3.max_steps=2.5"], "run.yaml.stage3.max_steps: expected an integer"),
    "unknown choice": (["stage3.pooling=mean"], "run.yaml.stage3.pooling: 'mean'; expected one of"),
    "stage II reward rule": (["stage2.causal_form=ranked", "stage2.lambda_causal=0.9"], "run.yaml.stage2: "),
    "a baseline's value": (["baselines.sft.lr=0"], "run.yaml.baselines.sft.lr: must be > 0"),
    **({} if importlib.util.find_spec("vllm") else {  # an engine this environment cannot run
        "vLLM rollouts here": (["stage2.engine=vllm"], "run.yaml.stage2.engine: engine vllm needs vLLM"),
        "vLLM evaluation here": (["eval.engine=vllm"], "run.yaml.eval.engine: engine vllm needs vLLM")}),
    "unknown engine": (["stage3.engine=sglang"], "run.yaml.stage3.engine: 'sglang'; expected one of"),
    "no steps and no epochs": (["stage1.max_steps=0", "stage1.epochs=0"],
                               "run.yaml.stage1.max_steps: 0 (use epochs) with epochs 0: nothing would be trained"),
    "no curriculum steps": (["baselines.coconut.steps_per_stage=0", "baselines.coconut.epochs_per_stage=0"],
                            "run.yaml.baselines.coconut.steps_per_stage: 0 (use epochs_per_stage) with "
                            "epochs_per_stage 0"),
    "the eval section": (["eval.batch_size=0"], "run.yaml.eval.batch_size: must be in [1, 1048576], got 0"),
    "batch x sequence over the memory": (["stage1.batch_size=1000000"],
                                         "run.yaml.stage1.batch_size: one training step needs at least"),
    "rollouts over the memory": (["stage2.max_new_tokens=100000"],
                                 "run.yaml.stage2.max_new_tokens: one training step needs at least"),
}


def _one_line(capsys, argv: list[str], culprit: str, tmp_path: Path) -> None:
    before = sorted(tmp_path.rglob("*"))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"medsynapse {argv[0]}: error: ") and culprit in lines[0], lines[0]
    assert sorted(tmp_path.rglob("*")) == before  # nothing written: no output folder, no lock, no checkpoint


@pytest.fixture
def memory_24gib(monkeypatch):
    monkeypatch.setenv(MEMORY_ENV, "24")
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.mark.parametrize("case", sorted(BAD))
def test_pipeline_refuses_any_bad_value_of_any_stage_before_anything_trains(case, tmp_path, capsys, memory_24gib):
    overrides, culprit = BAD[case]
    _one_line(capsys, ["pipeline", "--config", str(_run_file(tmp_path)), "--set", *overrides], culprit, tmp_path)


TRAIN = [["train", "stage1"], ["train", "stage3"], ["train", "baseline", "--method", "sft"]]


@pytest.mark.parametrize("command", TRAIN)
@pytest.mark.parametrize("case", ["nan lr in stage II", "huge n_memory"])
def test_train_checks_every_stage_of_the_run_file_not_only_its_own(command, case, tmp_path, capsys, memory_24gib):
    overrides, culprit = BAD[case]
    _one_line(capsys, [*command, "--config", str(_run_file(tmp_path)), "--set", *overrides], culprit, tmp_path)


@pytest.mark.parametrize("command", TRAIN)
def test_train_checks_the_memory_of_what_it_trains_only(command, tmp_path, capsys, memory_24gib):
    """Stage I's batch of a million: `train stage1` and the SFT baseline (Stage I's batch) are refused; `train
    stage3` is not (Stage I may train on another machine); it stops later, at its missing Stage II folder."""
    argv = [*command, "--config", str(_run_file(tmp_path)), "--set", "stage1.batch_size=1000000"]
    if command[1] == "stage3":
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "one training step needs" not in err and "stage2" in err, err
    else:
        _one_line(capsys, argv, "run.yaml.stage1.batch_size: one training step needs at least", tmp_path)
    capsys.readouterr()  # a pipeline that only converts trains nothing: no memory bound
    assert main(["pipeline", "--config", str(_run_file(tmp_path)), "--until", "convert", "--set",
                 "stage1.batch_size=1000000"]) == 0


def _study_file(tmp_path: Path, row_set: list[str]) -> Path:
    run = _run_file(tmp_path)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"run": str(run), "output": str(tmp_path / "study_out"), "seeds": [0],
                                    "rows": {"good": {"model": "stage2"},
                                             "odd": {"model": "stage3", "set": row_set}}}))
    return path


@pytest.mark.parametrize("plan", [True, False])
def test_study_checks_every_rows_run_before_planning_or_building(plan, tmp_path, capsys, memory_24gib):
    study = _study_file(tmp_path, ["stage2.lr=.nan"])
    argv = ["study", "--config", str(study), *(["--plan"] if plan else [])]
    _one_line(capsys, argv, "study.yaml.rows.odd: ", tmp_path)
    _one_line(capsys, argv, "run.yaml.stage2.lr: must be a finite number", tmp_path)


def test_running_a_study_checks_each_rows_memory_and_the_plan_does_not(tmp_path, capsys, memory_24gib):
    study = _study_file(tmp_path, ["stage1.batch_size=1000000"])
    read_study(study)  # planning prices GPU-hours on any machine: values only
    _one_line(capsys, ["study", "--config", str(study)], "stage1.batch_size: one training step needs at least",
              tmp_path)


def test_a_section_naming_its_own_folders_is_checked_and_named(tmp_path, capsys, memory_24gib):
    stage2 = run_file(tmp_path / "stage2.yaml", "stage2", dict(
        model=str(tmp_path / "no_model"), train_file=str(tmp_path / "train.jsonl"), output_dir=str(tmp_path / "out"),
        lr=float("nan")))
    _one_line(capsys, ["train", "stage2", "--config", str(stage2)], "stage2.yaml.stage2.lr: must be a finite number",
              tmp_path)
    sft = run_file(tmp_path / "sft.yaml", "sft", dict(model=str(tmp_path / "no_model"), train_file="x",
                                                      output_dir=str(tmp_path / "out"), lora_dropout=1.0))
    _one_line(capsys, ["train", "baseline", "--method", "sft", "--config", str(sft)],
              "sft.yaml.baselines.sft.lora_dropout: must be in [0, 1)", tmp_path)


def test_a_flat_recipe_file_is_refused_saying_where_its_keys_go(tmp_path, capsys):
    flat = tmp_path / "stage1.yaml"
    flat.write_text(f"vlm: {tmp_path / 'vlm'}\ntrain_file: x.jsonl\noutput_dir: {tmp_path / 'out'}\n")
    _one_line(capsys, ["train", "stage1", "--config", str(flat)], "stage1.yaml: not a run file", tmp_path)


def test_the_demo_refuses_before_building_its_shared_folders(tmp_path, capsys, memory_24gib):
    argv = ["demo", "--config", str(CONFIGS / "synthmed.yaml"), "--output", str(tmp_path / "demo"),
            "--cache-dir", str(tmp_path / "cache")]
    _one_line(capsys, [*argv, "--set", "stage2.lr=.nan"], "synthmed.yaml.stage2.lr: must be a finite number",
              tmp_path)
    _one_line(capsys, [*argv, "--ablations", "--set", "baselines.grpo.top_p=0"],
              "synthmed.yaml.baselines.grpo.top_p: must be in (0, 1]", tmp_path)


def test_the_memory_bound_is_against_this_machine_and_shared_by_the_processes(monkeypatch):
    run = read_run_config(CONFIGS / "medsynapse-v-8b.yaml")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv(MEMORY_ENV, "24")  # a 24 GiB machine cannot hold 32 rollouts of 1024 tokens at 8B
    with pytest.raises(ConfigError, match=r"medsynapse-v-8b\.yaml\.stage2\.max_new_tokens: one training step needs at "
                                          r"least 4\d\.\d GiB .* more than \$MEDSYNAPSE_MEMORY_GIB 24\.0 GiB"):
        check_run(run)
    check_run(run, memory=False)  # its values are fine
    monkeypatch.setenv("WORLD_SIZE", "8")  # 8 processes: 4 rollouts each
    check_run(run)


@pytest.mark.parametrize("name", ["synthmed.yaml", "medsynapse-v-8b.yaml", "medsynapse-v-4b.yaml"])
def test_every_shipped_run_file_passes(name, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv(MEMORY_ENV, "141" if "-v-" in name else "8")  # the H200 of docs/training.md's sizing; a laptop
    check_run(read_run_config(CONFIGS / name))


@pytest.mark.parametrize("name", ["study-synthmed.yaml", "study-8b.yaml"])
def test_every_row_of_the_shipped_studies_passes(name, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv(MEMORY_ENV, "141")
    from medsynapse.study import check_rows

    study, raw, source = read_study(CONFIGS / name)
    check_rows(study, raw, source, name, memory=True)


def test_the_defaults_pass():
    from medsynapse.recipes.coconut import CoconutConfig
    from medsynapse.recipes.mcout import MCOUTConfig
    from medsynapse.recipes.sft import SFTConfig
    from medsynapse.recipes.stage1_warmup import Stage1Config
    from medsynapse.recipes.stage2_ccr import Stage2Config
    from medsynapse.recipes.stage3_imt import Stage3Config

    for cls in (Stage1Config, Stage2Config, Stage3Config, SFTConfig, CoconutConfig, MCOUTConfig):
        check_config(cls(), cls.__name__)
    from medsynapse.recipes.prepare_base import BasePrepConfig

    check_config(BasePrepConfig(vlm="v", train_file="t", output_dir="o"), "BasePrepConfig")  # the demo's base
