"""A full disk, a read-only or forbidden output folder: one line naming the folder, exit code 1, no traceback (but
with --debug), nothing half-written kept, and the resume after it correct. A refused `eval` leaves nothing behind,
not even its lock file. Tests run as root, where chmod does not stop writes: the failures are raised where the
writes happen, with the errno the OS gives."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from conftest import run_file

from medsynapse.cli import main
from medsynapse.locking import LOCK_NAME, OutputNotWritable, writes_into


def _lines(capsys) -> list[str]:
    """stderr's lines but the progress bars' (a training prints its bar there before it fails)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.strip() and "%|" not in line]


def _stage1_yaml(tiny_env, tmp_path: Path) -> Path:
    return run_file(tmp_path / "stage1.yaml", "stage1", dict(
        vlm=str(tiny_env.vlm), encoder=str(tiny_env.encoder), train_file=str(tiny_env.train_file),
        output_dir=str(tmp_path / "out"), n_memory=4, sampler_width=32, batch_size=4, max_steps=2, save_every=1,
        report_to="none"))


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_resume_takes_the_last_complete_one(
        tiny_env, tmp_path, capsys, monkeypatch):
    from medsynapse.recipes import trainer

    config = _stage1_yaml(tiny_env, tmp_path)
    checkpoints = tmp_path / "out" / "checkpoints"
    real_save_file = trainer.save_file

    def save_file(tensors, path):
        if "step_0000002" in path:  # the disk fills up while the second checkpoint is written
            Path(path).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(tensors, path)

    monkeypatch.setattr(trainer, "save_file", save_file)
    capsys.readouterr()
    assert main(["train", "stage1", "--config", str(config)]) == 1
    lines = _lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"medsynapse train: error: {checkpoints}: cannot write checkpoint step 2: no space "
                               "left on its device (No space left on device); free some space"), lines[0]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000001"]  # the half-written one is gone
    monkeypatch.undo()
    assert main(["train", "stage1", "--config", str(config), "--resume"]) == 0
    state = json.loads((checkpoints / "step_0000002" / "state.json").read_text())
    assert state["step"] == 2 and (tmp_path / "out" / "medsynapse.json").is_file()


def test_torch_saves_bare_write_failure_on_a_full_disk_names_the_checkpoint_folder(tmp_path, monkeypatch):
    import torch

    from medsynapse.recipes import trainer

    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer.save_checkpoint(tmp_path, 1, module, optimizer, scheduler)
    real_save = trainer.torch.save

    def save(obj, path, *args, **kwargs):
        if str(path).endswith("scheduler.pt"):  # torch.save's words when the disk is full: no errno
            raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        return real_save(obj, path, *args, **kwargs)

    class Full:
        f_bavail = 0  # no free block left

    monkeypatch.setattr(trainer.torch, "save", save)
    with pytest.raises(RuntimeError, match="file write failed"):  # a disk with room: not the disk's fault
        trainer.save_checkpoint(tmp_path, 2, module, optimizer, scheduler)
    monkeypatch.setattr("medsynapse.locking.os.statvfs", lambda folder: Full())
    with pytest.raises(OutputNotWritable, match=rf"^{tmp_path / 'checkpoints'}: cannot write checkpoint step 2: no "
                                                "space left on its device"):
        trainer.save_checkpoint(tmp_path, 2, module, optimizer, scheduler)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001"]  # no .tmp_step_0000002


def test_debug_shows_the_traceback_of_a_full_disk(tiny_env, tmp_path, monkeypatch):
    from medsynapse.recipes import trainer

    def save_file(tensors, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer, "save_file", save_file)
    with pytest.raises(OutputNotWritable, match="no space left"):
        main(["train", "stage1", "--config", str(_stage1_yaml(tiny_env, tmp_path)), "--debug"])


def _eval_argv(tiny_env, out: Path) -> list[str]:
    return ["eval", "--model", str(tiny_env.vlm), "--benchmarks", "synthmed", "--path",
            f"synthmed={tiny_env.test_file.parent}", "--output", str(out), "--limit", "2", "--max-new-tokens", "2"]


@pytest.mark.parametrize("where", ["the output folder's lock", "the predictions", "metrics.json"])
def test_a_read_only_eval_output_is_one_line_naming_the_folder(where, tiny_env, tmp_path, capsys, monkeypatch):
    import medsynapse.eval.runner as runner
    import medsynapse.locking as locking

    out = tmp_path / "eval"
    read_only = OSError(errno.EROFS, "Read-only file system")
    if where == "the output folder's lock":
        def acquire(self, *args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", str(out / LOCK_NAME))

        monkeypatch.setattr(locking.FileLock, "acquire", acquire)
        folder = out
    elif where == "the predictions":
        real_open = Path.open

        def open_(self, mode="r", *args, **kwargs):
            if self.name == "predictions.jsonl" and "a" in mode:
                raise read_only
            return real_open(self, mode, *args, **kwargs)

        monkeypatch.setattr(runner.Path, "open", open_)
        folder = out / "synthmed"
    else:
        real_mkstemp = locking.tempfile.mkstemp

        def mkstemp(dir=None, prefix="", suffix=""):
            if prefix.startswith(".metrics.json"):
                raise read_only
            return real_mkstemp(dir=dir, prefix=prefix, suffix=suffix)

        monkeypatch.setattr(locking.tempfile, "mkstemp", mkstemp)
        folder = out / "synthmed"
    capsys.readouterr()
    assert main(_eval_argv(tiny_env, out)) == 1
    lines = _lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"medsynapse eval: error: {folder}: cannot write") and \
        "it is on a read-only file system (Read-only file system)" in lines[0], lines[0]


def test_an_unwrapped_disk_error_is_still_one_line_naming_its_path(tmp_path, capsys, monkeypatch):
    from medsynapse.cli import data as data_commands

    def fixtures(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "fx"))

    monkeypatch.setattr(data_commands, "cmd_fixtures", fixtures)
    capsys.readouterr()
    assert main(["fixtures", "--out", str(tmp_path / "fx")]) == 1
    assert _lines(capsys) == [f"medsynapse fixtures: error: {tmp_path / 'fx'}: no space left on its device (No space "
                              "left on device); free some space and rerun (training: with --resume)"]


def test_writes_into_maps_only_the_disks_failures(tmp_path, monkeypatch):
    quota = rf"^{tmp_path}: cannot write: the disk quota is exceeded"
    with pytest.raises(OutputNotWritable, match=quota), writes_into(tmp_path):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    with pytest.raises(OutputNotWritable, match="no space left"), writes_into(tmp_path):
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                           'left on device" })')  # safetensors' words
    with pytest.raises(RuntimeError, match="^file write failed$"), writes_into(tmp_path):
        raise RuntimeError("file write failed")  # the disk has room and the folder is writable: not the disk's
    with pytest.raises(FileNotFoundError), writes_into(tmp_path):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")
    monkeypatch.setattr("medsynapse.locking.os.access", lambda path, mode: False)
    with pytest.raises(OutputNotWritable, match="read-only"), writes_into(tmp_path / "not" / "yet"):
        raise RuntimeError("file write failed")  # its nearest existing folder refuses writes


# --- a refused eval writes nothing -------------------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


@pytest.mark.parametrize("case", ["missing dataset", "damaged model after the embedded images were written",
                                  "missing dataset into an existing empty folder"])
def test_a_refused_eval_leaves_nothing_behind(case, tiny_env, tmp_path, capsys):
    from medsynapse.data.sources.fixtures import write_fixtures

    data_root = write_fixtures(tmp_path / "data")
    out = tmp_path / "eval"
    model = str(tiny_env.vlm)
    benchmark = "vqa-rad"
    root = str(tmp_path / "nothing_here")
    if case.startswith("damaged"):
        broken = tmp_path / "broken_model"
        broken.mkdir()
        (broken / "medsynapse.json").write_text('{"vlm": "x", ')
        model, benchmark, root = str(broken), "gmai-mmbench", str(data_root)  # base64 images: written on loading
    if case.endswith("existing empty folder"):
        out.mkdir()
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert main(["eval", "--model", model, "--benchmarks", benchmark, "--data-root", root, "--output", str(out)]) == 2
    lines = _lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("medsynapse eval: error: "), lines
    assert _snapshot(tmp_path) == before  # no lock file, no image cache, no folder


def test_an_earlier_runs_folder_is_locked_before_loading(tiny_env, tmp_path):
    """A folder that already has its lock file is locked first: a busy one is refused before anything is read."""
    from medsynapse.eval.runner import EvalSettings, evaluate_benchmarks
    from medsynapse.locking import FolderInUseError, exclusive_output

    out = tmp_path / "eval"
    # the data root does not exist: the lock is what refuses
    with exclusive_output(out, "evaluation"), pytest.raises(FolderInUseError):
        evaluate_benchmarks(str(tiny_env.vlm), ["vqa-rad"], tmp_path / "no_data", out, EvalSettings())
    assert os.listdir(out) == [LOCK_NAME]
