"""Bad input at the command line: exit code 2, one line on stderr naming the culprit, no traceback, nothing written.

Table-driven: each case builds its files, runs `medsynapse ...` in-process and checks the same four promises.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from medsynapse.cli import main


def _image(tmp_path):
    path = tmp_path / "scan.png"
    Image.new("RGB", (32, 32), (80, 80, 80)).save(path)
    return path


def _stage1_yaml(tiny_env, tmp_path, extra: str = "") -> str:
    """A run file whose stage1 section holds the tiny settings plus `extra` (YAML lines, written as they are)."""
    lines = (f"vlm: {tiny_env.vlm}\nencoder: {tiny_env.encoder}\ntrain_file: {tiny_env.train_file}\n"
             f"output_dir: {tmp_path / 'out'}\nn_memory: 4\nsampler_width: 32\nbatch_size: 4\n{extra}").splitlines()
    path = tmp_path / "stage1.yaml"
    path.write_text(f"output: {tmp_path / 'run'}\nstage1:\n" + "".join(f"  {line}\n" for line in lines))
    return str(path)


def _broken_model(tmp_path):
    folder = tmp_path / "broken_model"
    folder.mkdir()
    (folder / "medsynapse.json").write_text('{"vlm": "x", ')
    return str(folder)


CASES = {
    "missing image": (lambda env, t: ["predict", "--model", str(env.vlm), "--image", str(t / "nope.png"),
                                      "--question", "q"], "nope.png"),
    "impossible window": (lambda env, t: ["predict", "--model", str(env.vlm), "--image", str(_image(t)),
                                          "--question", "q", "--window", "40", "0"], "width > 0"),
    "missing config": (lambda env, t: ["train", "stage1", "--config", str(t / "none.yaml")], "none.yaml"),
    "duplicate key": (lambda env, t: ["train", "stage1", "--config", _stage1_yaml(env, t, "batch_size: 8\n")],
                      "'batch_size' is given twice"),
    "unknown key": (lambda env, t: ["train", "stage1", "--config", _stage1_yaml(env, t, "learning_rate: 1\n")],
                    "learning_rate"),
    "broken yaml": (lambda env, t: ["train", "stage1", "--config", _stage1_yaml(env, t, "lr: [1,\n")],
                    "not valid YAML"),
    "negative steps": (lambda env, t: ["train", "stage1", "--config", _stage1_yaml(env, t), "--set",
                                       "stage1.max_steps=-1"], "max_steps"),
    "zero batch": (lambda env, t: ["train", "stage1", "--config", _stage1_yaml(env, t), "--set",
                                   "stage1.batch_size=0"],
                   "stage1.yaml.stage1.batch_size: must be in [1, 1048576], got 0"),
    "not a model folder": (lambda env, t: ["eval", "--model", str(t / "no_model"), "--benchmarks", "vqa-rad",
                                           "--data-root", str(t), "--output", str(t / "out")], "no_model"),
    "unknown benchmark": (lambda env, t: ["eval", "--model", str(env.vlm), "--benchmarks", "vqa-rud",
                                          "--data-root", str(t), "--output", str(t / "out")], "vqa-rud"),
    "unknown loader option": (lambda env, t: ["eval", "--model", str(env.vlm), "--benchmarks", "vqa-rad",
                                              "--data-root", str(t), "--output", str(t / "out"), "--option",
                                              "vqa-rad.layuot=hf"], "unknown option(s) ['layuot']; valid: layout"),
    "empty vlm": (lambda env, t: ["train", "stage1", "--config", _stage1_yaml(env, t), "--set", "stage1.vlm="],
                  "vlm is empty"),
    "damaged manifest": (lambda env, t: ["predict", "--model", _broken_model(t), "--image", str(_image(t)),
                                         "--question", "q"], "medsynapse.json"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_naming_the_culprit_and_writes_nothing(case, tiny_env, tmp_path, capsys):
    build, culprit = CASES[case]
    argv = build(tiny_env, tmp_path)
    before = {p for p in tmp_path.rglob("*")}
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and culprit in lines[0], lines[0]
    assert lines[0].startswith(f"medsynapse {argv[0]}: error: ")
    assert {p for p in tmp_path.rglob("*")} == before  # nothing written


def test_debug_keeps_the_traceback(tiny_env, tmp_path):
    with pytest.raises(ValueError, match="max_steps"):
        main(["train", "stage1", "--config", _stage1_yaml(tiny_env, tmp_path), "--set", "stage1.max_steps=-1",
              "--debug"])


def test_a_good_config_still_trains(tiny_env, tmp_path):
    assert main(["train", "stage1", "--config", _stage1_yaml(tiny_env, tmp_path), "--set", "stage1.max_steps=1"]) == 0
    state = json.loads((tmp_path / "out" / "checkpoints" / "step_0000001" / "state.json").read_text())
    assert state["settings"]["batch_size"] == 4


def _stage1_folder(tiny_env, tmp_path):
    from medsynapse.model.medsynapse import MedSynapseV

    model = MedSynapseV.build(str(tiny_env.vlm), str(tiny_env.encoder), n_memory=4, width=32, dtype="float32")
    folder = tmp_path / "s1"
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("damage", ["truncated weights", "other n_memory", "unknown format"])
def test_a_damaged_model_folder_is_one_line_naming_the_file(tiny_env, tmp_path, capsys, damage):
    folder = _stage1_folder(tiny_env, tmp_path)
    manifest_path = folder / "medsynapse.json"
    manifest = json.loads(manifest_path.read_text())
    if damage == "truncated weights":
        weights = folder / "sampler.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        culprit = "sampler.safetensors: damaged"
    elif damage == "other n_memory":
        manifest["sampler"]["n_memory"] = 8
        manifest_path.write_text(json.dumps(manifest))
        culprit = "written with other settings (e.g. n_memory)"
    else:
        manifest["format"] = 99
        manifest_path.write_text(json.dumps(manifest))
        culprit = "format 99 is not one this version reads"
    capsys.readouterr()
    assert main(["predict", "--model", str(folder), "--image", str(_image(tmp_path)), "--question", "q"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and culprit in lines[0] and "Traceback" not in err, err
