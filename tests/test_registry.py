"""One recipe registry (recipes/registry.py): every name resolves to one config class, one train function and one
folder; the CLI, the run file and the study choose recipes only through it; and what a run file resolves to is pinned.

The golden files under tests/golden/ hold `medsynapse config show` of the shipped run files and each study plan's
units per row (their keys hash every setting a unit trains with): a refactor that changes any resolved value, or any
unit a study would train, fails here. A deliberate change of a default regenerates them:
`MEDSYNAPSE_REGOLD=1 pytest tests/test_registry.py` (and says so in its commit: finished study units are retrained).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from pathlib import Path

import pytest
import yaml

from medsynapse.cli import main
from medsynapse.recipes import registry
from medsynapse.recipes.registry import BASELINES, RECIPES, STAGES
from medsynapse.runconfig import read_run_config, resolve, resolve_baseline

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
RUN_FILES = ("synthmed.yaml", "medsynapse-v-8b.yaml", "medsynapse-v-4b.yaml")
STUDY_FILES = ("study-synthmed.yaml", "study-8b.yaml")


def test_every_recipe_names_a_config_class_a_train_function_and_its_own_folder():
    assert STAGES == ("stage1", "stage2", "stage3")
    assert BASELINES == {"sft": "sft", "cot-sft": "cot_sft", "grpo": "grpo_only", "coconut": "coconut",
                         "mcout": "mcout", "ivt-lr": "ivt_lr"}
    folders = [r.folder for r in RECIPES.values()]
    assert len(set(folders)) == len(folders)
    for recipe in RECIPES.values():
        config_class = recipe.config_class()
        assert dataclasses.is_dataclass(config_class)
        assert recipe.starts_from in ("base", *STAGES)
        train = recipe.train()
        assert list(inspect.signature(train).parameters)[0] == "config"
        fields = {f.name for f in dataclasses.fields(config_class)}
        for forced in recipe.forced:
            assert forced.split("=")[0] in fields, (recipe.name, forced)
        for key, _ in recipe.unless_set:
            assert key in fields, (recipe.name, key)
    with pytest.raises(ValueError, match="unknown recipe 'stage4'.*baselines"):
        registry.recipe("stage4")


def test_stage_chain_follows_the_registry(tmp_path):
    run = read_run_config(ROOT / "configs" / "synthmed.yaml", [f"output={tmp_path}"])
    for stage in STAGES:
        starts = RECIPES[stage].starts_from
        config = resolve(run, stage)
        assert config.output_dir == str(tmp_path / RECIPES[stage].folder)
        if starts != "base":
            assert config.model == str(tmp_path / RECIPES[starts].folder)
    for method in BASELINES:
        assert resolve_baseline(run, method).output_dir == str(tmp_path / RECIPES[method].folder)


@pytest.mark.parametrize("name", ["stage2", "sft", "cot-sft", "grpo", "ivt-lr"])
def test_train_hands_the_registry_recipe_the_resolved_config(name, monkeypatch, tmp_path, capsys):
    """`train NAME` / `train baseline --method NAME` call the recipe's own train function with what the run file
    resolves to (stages) or what `resolve_baseline` gives (baselines); `train sft` is `train baseline --method sft`."""
    recipe = RECIPES[name]
    module = __import__(f"medsynapse.recipes.{recipe.module}", fromlist=[recipe.train_name])
    received = []
    monkeypatch.setattr(module, recipe.train_name, lambda config, **_: received.append(config) or "OUT")
    monkeypatch.setattr("medsynapse.values.check_run", lambda *a, **k: None)  # the tiny-VLM shape is not built here
    run_file = str(ROOT / "configs" / "synthmed.yaml")
    argv = ["train", name] if recipe.kind == "stage" else ["train", "baseline", "--method", name]
    assert main([*argv, "--config", run_file, "--set", f"output={tmp_path}"]) == 0
    run = read_run_config(run_file, [f"output={tmp_path}"])
    expected = resolve(run, name) if recipe.kind == "stage" else resolve_baseline(run, name)
    assert received == [expected]
    if name == "sft":
        assert main(["train", "sft", "--config", run_file, "--set", f"output={tmp_path}"]) == 0
        assert received[1] == expected
    assert capsys.readouterr().out.strip().endswith("saved to OUT")


def test_a_baseline_gets_the_methods_own_settings_over_the_stage_it_is_filled_from(monkeypatch, tmp_path):
    """GRPO-only is Stage II's settings with no memory and no causal term, even where stage2 sets a causal weight;
    IVT-LR's K is the reference's 32 unless its section says otherwise; Coconut has none."""
    received = []
    from medsynapse.recipes import coconut, stage2_ccr

    monkeypatch.setattr(stage2_ccr, "train_stage2", lambda config, **_: received.append(config) or "OUT")
    monkeypatch.setattr(coconut, "train_coconut", lambda config, **_: received.append(config) or "OUT")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp_path / "run"), "model": {"vlm": "M"},
                                    "data": {"stage1_file": "T.jsonl"}, "stage2": {"lambda_causal": 0.7}}))
    assert main(["train", "baseline", "--method", "grpo", "--config", str(path)]) == 0
    assert received[-1].use_memory is False and received[-1].lambda_causal == 0.0 and received[-1].model == "M"
    assert main(["train", "baseline", "--method", "ivt-lr", "--config", str(path)]) == 0
    assert received[-1].patches_per_step == 32
    assert main(["train", "baseline", "--method", "coconut", "--config", str(path)]) == 0
    assert received[-1].patches_per_step == 0
    assert main(["train", "baseline", "--method", "ivt-lr", "--config", str(path), "--set",
                 "baselines.ivt-lr.patches_per_step=4"]) == 0
    assert received[-1].patches_per_step == 4


def _resolved(name: str) -> dict:
    from medsynapse.runconfig import show

    return json.loads(json.dumps(show(read_run_config(ROOT / "configs" / name))))


def _planned_units(name: str) -> dict:
    from medsynapse.study import describe_plan, read_study

    plan = describe_plan(*read_study(ROOT / "configs" / name))
    return {row: {"units": spec["units"], "evaluation": spec["evaluation"], "reference": spec["reference"],
                  "answer_format": spec["answer_format"]} for row, spec in plan["rows"].items()}


@pytest.mark.parametrize("name", RUN_FILES + STUDY_FILES)
def test_what_the_shipped_files_resolve_to_is_unchanged(name):
    current = _resolved(name) if name in RUN_FILES else _planned_units(name)
    golden = GOLDEN / f"{Path(name).stem}.json"
    if os.environ.get("MEDSYNAPSE_REGOLD"):
        golden.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    assert current == json.loads(golden.read_text()), (
        f"{name} resolves differently from {golden.relative_to(ROOT)}; if that is meant, regenerate it "
        "(MEDSYNAPSE_REGOLD=1) and say in the commit that finished study units will be retrained")


def test_a_run_file_without_a_baselines_section_gets_the_methods_own_settings(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"output: {tmp_path / 'out'}\nmodel:\n  vlm: V\ndata:\n  stage1_file: T.jsonl\n")
    run = read_run_config(path)
    assert resolve_baseline(run, "ivt-lr").patches_per_step == 32
    assert resolve_baseline(run, "coconut").patches_per_step == 0
    assert (resolve_baseline(run, "sft").target, resolve_baseline(run, "cot-sft").target) == ("answer", "rationale")
    grpo = resolve_baseline(run, "grpo")
    assert (grpo.use_memory, grpo.lambda_causal, grpo.model) == (False, 0.0, "V")


@pytest.mark.parametrize(("override", "key"), [("stage2.dtype=float8", "stage2.dtype"),
                                               ("stage3.pooling=mean", "stage3.pooling"),
                                               ("baselines.cot-sft.target=essay", "baselines.cot-sft.target")])
def test_an_unknown_choice_is_refused_when_the_file_is_read_naming_file_key_and_values(override, key):
    from medsynapse.config import ConfigError
    from medsynapse.recipes.config_base import CHOICES
    from medsynapse.runconfig import show

    path = ROOT / "configs" / "medsynapse-v-8b.yaml"
    with pytest.raises(ConfigError) as caught:
        show(read_run_config(path, [override]))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}.{key}: ")
    assert str(list(CHOICES[key.rsplit(".", 1)[1]])) in message


def test_a_flat_file_with_an_unknown_choice_names_its_key(tmp_path):
    from medsynapse.config import ConfigError, load_config
    from medsynapse.recipes.sft import SFTConfig

    flat = tmp_path / "sft.yaml"
    flat.write_text("model: M\ndistributed: zero3\n")
    with pytest.raises(ConfigError, match=r"sft\.yaml\.distributed: 'zero3'; expected one of \['ddp', 'fsdp'\]"):
        load_config(SFTConfig, flat)
    assert load_config(SFTConfig, flat, ["distributed=fsdp"]).distributed == "fsdp"
