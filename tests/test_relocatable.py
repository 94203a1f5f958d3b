"""Relocatable model folders (model/bases.py): a saved folder names its base VLM and prior encoder by name and content
hash, never by absolute path; copied elsewhere together with its bases it loads and answers exactly as before; a
base that cannot be found, or a folder with other content, is one clear refusal; old folders (absolute paths) still
load; and everything a save writes has the mode the umask gives a new file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from medsynapse.cli import main
from medsynapse.data.images import load_image
from medsynapse.data.schema import read_samples
from medsynapse.locking import write_bytes_atomic, write_text_atomic
from medsynapse.model.bases import (
    BaseFolders,
    BaseMismatchError,
    BaseNotFoundError,
    BaseRef,
    base_name,
    content_sha256,
    find_base,
    resolve_base,
)
from medsynapse.model.card import set_evaluation
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.memory import AutonomousConfig, AutonomousMemoryModule, embedding_rms
from medsynapse.model.vlm import vision_features

VLM, ENCODER = "vlm_base-tiny", "encoder-tiny"  # named as the demo's cache names its folders
TEACHER_FILES = {"README.md", "medsynapse.json", "sampler.safetensors", "reference_bank.safetensors",
                 "adapter/README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
STUDENT_FILES = {"README.md", "medsynapse.json", "autonomous.safetensors", "adapter/README.md",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"}


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _outputs(model: MedSynapseV, samples, images) -> tuple[torch.Tensor, list[str]]:
    """Teacher-forced logits (memory included) and greedy answers."""
    batch = model.prompts.collate([model.prompts.encode([im], s.question, s.answer) for im, s in zip(images, samples)])
    with torch.no_grad():
        features = vision_features(model.vlm, batch)
        memory = model.memory_for(batch, images, features)
        logits = model.forward(batch, memory, features=features, labels=None).logits
    return logits, model.answer(images, [s.question for s in samples], max_new_tokens=4)


def _teacher(vlm: Path, encoder: Path) -> MedSynapseV:
    """VLM + prior encoder + P_phi + a LoRA that really changes the answers, and a reference bank."""
    torch.manual_seed(0)
    teacher = MedSynapseV.build(str(vlm), str(encoder), n_memory=4, width=32, dtype="float32")
    teacher.add_lora(4, 8, 0.0, ["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in teacher.vlm.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    teacher.reference_bank = torch.randn(2, 4, teacher.encoder.feature_dim, generator=g)
    return teacher.eval()


def _student(teacher: MedSynapseV, vlm: Path) -> MedSynapseV:
    torch.manual_seed(2)
    config = AutonomousConfig(hidden_size=128, n_memory=4, pooling="attention", attention_dim=16,
                              embed_rms=embedding_rms(teacher.vlm.get_input_embeddings()))
    return MedSynapseV(teacher.vlm, teacher.processor, vlm_path=str(vlm),
                       autonomous=AutonomousMemoryModule(config)).eval()


@pytest.fixture(scope="module")
def made(tiny_env, tmp_path_factory):
    """A teacher and a student saved under orig/models, their bases under orig/bases (own copies of the tiny ones,
    so a test may move them), and their outputs loaded from there."""
    root = tmp_path_factory.mktemp("orig")
    vlm, encoder = root / "bases" / VLM, root / "bases" / ENCODER
    shutil.copytree(tiny_env.vlm, vlm)
    shutil.copytree(tiny_env.encoder, encoder)
    teacher = _teacher(vlm, encoder)
    settings = {"vlm": str(vlm), "encoder": str(encoder), "train_file": str(tiny_env.train_file),
                "output_dir": str(root / "models" / "teacher"), "lr": 1e-3}
    training = {"recipe": "stage2", "config_hash": "0123456789abcdef", "source": str(vlm), "settings": settings}
    teacher.save_pretrained(root / "models" / "teacher", training=training)
    _student(teacher, vlm).save_pretrained(root / "models" / "student", training={**training, "recipe": "stage3"})
    samples = read_samples(tiny_env.test_file)[:3]
    images = [load_image(s.images[0], s) for s in samples]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDSYNAPSE_CACHE", str(root / "bases"))  # where they were saved from
        before = {name: _outputs(MedSynapseV.from_pretrained(root / "models" / name), samples, images)
                  for name in ("teacher", "student")}
    return SimpleNamespace(root=root, vlm=vlm, encoder=encoder, teacher=teacher, samples=samples, images=images,
                           before=before, training=training)


def _copy_model(made, name: str, to: Path) -> Path:
    shutil.copytree(made.root / "models" / name, to)
    return to


# --- moved together, a folder loads and answers exactly as before -----------------------------------------------------
def test_a_folder_moved_with_its_bases_loads_and_gives_identical_outputs(made, tmp_path, monkeypatch):
    cache = tmp_path / "new_machine" / "cache"  # holds only the copies
    shutil.copytree(made.vlm, cache / VLM)
    shutil.copytree(made.encoder, cache / ENCODER)
    monkeypatch.setenv("MEDSYNAPSE_CACHE", str(cache))
    folders = {name: _copy_model(made, name, tmp_path / "new_machine" / "models" / name)
               for name in ("teacher", "student")}
    gone = made.root / "bases.renamed"
    (made.root / "bases").rename(gone)  # the original bases are no longer where they were
    try:
        for name, folder in folders.items():
            model = MedSynapseV.from_pretrained(folder)
            assert model.vlm_path == str(cache / VLM)
            assert model.encoder_path == (str(cache / ENCODER) if name == "teacher" else None)
            logits, answers = _outputs(model, made.samples, made.images)
            assert torch.equal(logits, made.before[name][0]), name
            assert answers == made.before[name][1], name
    finally:
        gone.rename(made.root / "bases")


def test_the_teachers_lora_and_memory_matter_so_identical_outputs_mean_something(made, tmp_path, monkeypatch):
    """The outputs compared above depend on the adapter: without it the logits move by more than a nat."""
    monkeypatch.setenv("MEDSYNAPSE_CACHE", str(tmp_path / "empty_cache"))
    model = MedSynapseV.from_pretrained(made.root / "models" / "teacher")
    with model.vlm.disable_adapter():
        without, _ = _outputs(model, made.samples, made.images)
    assert (without - made.before["teacher"][0]).abs().max() > 1.0


@pytest.mark.parametrize("where", ["given", "cache", "beside", "hint"])
def test_each_place_of_the_search_path_finds_the_bases(made, tmp_path, monkeypatch, where):
    monkeypatch.setenv("MEDSYNAPSE_CACHE", str(tmp_path / "cache"))
    folder = _copy_model(made, "teacher", tmp_path / "machine" / "models" / "teacher")
    places = {"given": tmp_path / "anywhere", "cache": tmp_path / "cache", "beside": tmp_path / "machine" / "models",
              "hint": tmp_path / "machine" / "bases"}  # the hint: ../../bases/NAME, as when it was saved
    names = ("my-vlm", "my-encoder") if where == "given" else (VLM, ENCODER)  # a given folder may have any name
    vlm, encoder = places[where] / names[0], places[where] / names[1]
    shutil.copytree(made.vlm, vlm)
    shutil.copytree(made.encoder, encoder)
    given = BaseFolders(str(vlm), str(encoder)) if where == "given" else BaseFolders()
    manifest = json.loads((folder / "medsynapse.json").read_text())
    assert resolve_base(manifest["vlm"], folder, "vlm", given.vlm) == str(vlm)
    assert resolve_base(manifest["encoder"], folder, "encoder", given.encoder) == str(encoder)


def test_the_search_order_is_given_cache_beside_hint(made, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSYNAPSE_CACHE", str(tmp_path / "cache"))
    folder = _copy_model(made, "teacher", tmp_path / "machine" / "models" / "teacher")
    ref = BaseRef.from_dict(json.loads((folder / "medsynapse.json").read_text())["vlm"])
    order = [tmp_path / "given", tmp_path / "cache" / VLM, tmp_path / "machine" / "models" / VLM,
             tmp_path / "machine" / "bases" / VLM]
    for path in order:
        shutil.copytree(made.vlm, path)
    assert find_base(ref, folder, "vlm", str(order[0])) == order[0]
    for path in order[1:]:
        assert find_base(ref, folder, "vlm") == path
        shutil.rmtree(path)


def test_a_hugging_face_cache_snapshot_is_recorded_by_hub_id_and_found_in_the_cache(made, tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--Qwen--Tiny-VL" / "snapshots" / "0a1b2c"
    shutil.copytree(made.vlm, snapshot)
    assert base_name(snapshot) == "Qwen/Tiny-VL"
    ref = BaseRef("Qwen/Tiny-VL", content_sha256(snapshot))
    monkeypatch.setenv("MEDSYNAPSE_CACHE", str(tmp_path / "hub"))
    assert find_base(ref, tmp_path / "model", "vlm") == snapshot
    shutil.rmtree(tmp_path / "hub")
    shutil.copytree(made.vlm, tmp_path / "hub" / "Tiny-VL")  # `hf download --local-dir CACHE/Tiny-VL`
    assert find_base(ref, tmp_path / "model", "vlm") == tmp_path / "hub" / "Tiny-VL"


# --- refusals ---------------------------------------------------------------------------------------------------------
def _predict(folder: Path, tmp_path: Path, *extra: str) -> list[str]:
    from PIL import Image

    image = tmp_path / "scan.png"
    Image.new("RGB", (32, 32), (80, 80, 80)).save(image)
    return ["predict", "--model", str(folder), "--image", str(image), "--question", "q", *extra]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("role", ["vlm", "encoder"])
def test_a_base_found_nowhere_is_one_line_naming_it_its_hash_and_where_it_looked(made, tmp_path, monkeypatch,
                                                                                 capsys, role):
    cache = tmp_path / "empty_cache"
    monkeypatch.setenv("MEDSYNAPSE_CACHE", str(cache))
    folder = _copy_model(made, "teacher", tmp_path / "lonely" / "teacher")
    manifest = json.loads((folder / "medsynapse.json").read_text())
    if role == "encoder":  # the VLM is found beside the model folder, the encoder nowhere
        shutil.copytree(made.vlm, tmp_path / "lonely" / VLM)
    name, sha = manifest[role]["name"], manifest[role]["sha256"]
    label, flag = {"vlm": ("base VLM", "--vlm"), "encoder": ("prior encoder", "--encoder")}[role]
    expected = (f"medsynapse predict: error: {folder}/medsynapse.json: the {label} '{name}' (sha256 {sha}) was not "
                f"found; looked in $MEDSYNAPSE_CACHE: {cache}/{name} (absent); next to the model folder: "
                f"{tmp_path}/lonely/{name} (absent); the recorded relative_hint ../../bases/{name}: "
                f"{tmp_path}/bases/{name} (absent). Point to it with {flag} DIR, or put it (as '{name}') under "
                "$MEDSYNAPSE_CACHE or next to the model folder")
    capsys.readouterr()
    assert main(_predict(folder, tmp_path)) == 2
    assert _one_line(capsys) == expected
    with pytest.raises(BaseNotFoundError):
        MedSynapseV.from_pretrained(folder)


class Recorded(ValueError):
    """Raised by the stand-in loader once it has recorded the base folders it was given."""


@pytest.mark.parametrize("command", ["predict", "eval", "diagnose", "serve", "app"])
def test_every_command_that_loads_a_model_folder_passes_vlm_and_encoder_on(tiny_env, tmp_path, monkeypatch, capsys,
                                                                           command):
    if command == "app":
        pytest.importorskip("gradio")
    given = []

    def loader(cls, folder, dtype="auto", merge_adapter=False, bases=None):
        given.append(bases)
        raise Recorded("recorded")

    monkeypatch.setattr(MedSynapseV, "from_pretrained", classmethod(loader))
    model = str(tmp_path / "model")
    Path(model).mkdir()
    (Path(model) / "medsynapse.json").write_text("{}")
    data = str(tiny_env.test_file)
    args = {"predict": _predict(Path(model), tmp_path)[1:],
            "eval": ["--model", model, "--benchmarks", "synthmed", "--data-root", str(tiny_env.train_file.parent),
                     "--output", str(tmp_path / "out")],
            "diagnose": ["--model", model, "--data", data, "--output", str(tmp_path / "out")],
            "serve": ["--model", model], "app": ["--model", model]}[command]
    assert main([command, *args, "--vlm", "/elsewhere/vlm", "--encoder", "/elsewhere/encoder"]) == 2
    assert "error: recorded" in capsys.readouterr().err
    assert given == [BaseFolders("/elsewhere/vlm", "/elsewhere/encoder")]


def _other_vlm(made, to: Path) -> Path:
    """Another checkpoint of the same architecture: same files and sizes, one weight changed."""
    shutil.copytree(made.vlm, to)
    weights = load_file(str(to / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.5
    save_file(weights, str(to / "model.safetensors"), metadata={"format": "pt"})
    return to


def test_a_given_base_with_other_content_is_refused_naming_both_hashes(made, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDSYNAPSE_CACHE", str(tmp_path / "empty_cache"))
    folder = _copy_model(made, "student", tmp_path / "models" / "student")
    other = _other_vlm(made, tmp_path / "other-vlm")
    recorded, found = content_sha256(made.vlm), content_sha256(other)
    assert found != recorded
    expected = (f"medsynapse predict: error: --vlm {other}: its content (sha256 {found}) is not the base VLM "
                f"'{VLM}' (sha256 {recorded}) that {folder}/medsynapse.json was saved with; refused (give the folder "
                "it was saved with)")
    capsys.readouterr()
    assert main(_predict(folder, tmp_path, "--vlm", str(other))) == 2
    assert _one_line(capsys) == expected
    shutil.copytree(made.vlm, tmp_path / "empty_cache" / VLM)  # a match in the cache does not override a given folder
    with pytest.raises(BaseMismatchError):
        MedSynapseV.from_pretrained(folder, bases=BaseFolders(vlm=str(other)))


def test_a_same_named_base_with_other_content_is_passed_over_and_named_when_nothing_matches(made, tmp_path,
                                                                                          monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEDSYNAPSE_CACHE", str(cache))
    folder = _copy_model(made, "student", tmp_path / "models" / "student")
    ref = BaseRef.from_dict(json.loads((folder / "medsynapse.json").read_text())["vlm"])
    other = _other_vlm(made, cache / VLM)
    found = content_sha256(other)
    message = (f"{folder}/medsynapse.json: the base VLM '{VLM}' (sha256 {ref.sha256}) was not found; only other "
               f"content under that name: {other} ($MEDSYNAPSE_CACHE, sha256 {found}); refused. Point --vlm DIR at "
               "the folder it was saved with")
    with pytest.raises(BaseMismatchError) as refused:
        find_base(ref, folder, "vlm")
    assert str(refused.value) == message
    shutil.copytree(made.vlm, tmp_path / "models" / VLM)  # the right one beside the model folder: used
    assert find_base(ref, folder, "vlm") == tmp_path / "models" / VLM


# --- what a save writes -----------------------------------------------------------------------------------------------
def test_no_file_a_save_writes_names_an_absolute_path(made):
    originals = {str(made.root), str(made.vlm), str(made.vlm.resolve()), str(made.encoder), str(made.root.parent)}
    for name, expected in (("teacher", TEACHER_FILES), ("student", STUDENT_FILES)):
        folder = made.root / "models" / name
        assert _files(folder) == expected, name  # every file the save wrote is checked
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not [o for o in originals if o.encode() in data], path
    manifest = json.loads((made.root / "models" / "teacher" / "medsynapse.json").read_text())
    assert manifest["format"] == 2
    assert manifest["vlm"] == {"name": VLM, "sha256": content_sha256(made.vlm),
                               "relative_hint": f"../../bases/{VLM}"}
    assert manifest["encoder"] == {"name": ENCODER, "sha256": content_sha256(made.encoder),
                                   "relative_hint": f"../../bases/{ENCODER}"}
    adapter = json.loads((made.root / "models" / "student" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == VLM
    card = (made.root / "models" / "teacher" / "README.md").read_text()
    assert f"- base VLM: `{VLM}` (content sha256 `{content_sha256(made.vlm)}`)" in card
    assert '"train_file": "train.jsonl"' in card and "- trained from: `vlm_base-tiny`" in card


def test_a_loaded_folder_saved_again_records_its_bases_and_never_asks_the_hub(made, tmp_path, monkeypatch):
    """A resumed stage or Stage III's student saves a loaded model again: the adapter file names the base by name,
    but peft, saving, must still see the local folder (a bare name would send it to the hub to compare vocabularies)."""
    import peft.utils.save_and_load as peft_save

    def no_hub(*args, **kwargs):
        raise AssertionError(f"peft asked the hub about {args}")

    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", no_hub)
    monkeypatch.setenv("MEDSYNAPSE_CACHE", str(tmp_path / "cache"))
    shutil.copytree(made.vlm, tmp_path / "cache" / VLM)
    shutil.copytree(made.encoder, tmp_path / "cache" / ENCODER)
    folder = _copy_model(made, "teacher", tmp_path / "models" / "teacher")
    MedSynapseV.from_pretrained(folder).save_pretrained(tmp_path / "again")
    manifest = json.loads((tmp_path / "again" / "medsynapse.json").read_text())
    assert manifest["vlm"] == {"name": VLM, "sha256": content_sha256(made.vlm), "relative_hint": f"../cache/{VLM}"}
    adapter = json.loads((tmp_path / "again" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == VLM


def test_an_old_folder_naming_its_bases_by_absolute_path_still_loads(made, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSYNAPSE_CACHE", str(tmp_path / "empty_cache"))
    folder = _copy_model(made, "teacher", tmp_path / "old" / "teacher")
    manifest = json.loads((folder / "medsynapse.json").read_text())
    manifest.update(format=1, vlm=str(made.vlm.resolve()), encoder=str(made.encoder.resolve()))  # as 1 wrote it
    (folder / "medsynapse.json").write_text(json.dumps(manifest))
    model = MedSynapseV.from_pretrained(folder)
    assert model.vlm_path == str(made.vlm.resolve())
    logits, answers = _outputs(model, made.samples, made.images)
    assert torch.equal(logits, made.before["teacher"][0]) and answers == made.before["teacher"][1]
    moved = tmp_path / "moved-vlm"  # no hash recorded: a given folder is taken as it is
    shutil.copytree(made.vlm, moved)
    assert resolve_base(manifest["vlm"], folder, "vlm", str(moved)) == str(moved)


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)],
                         ids=["umask022", "umask027"])
def test_everything_a_save_writes_has_the_mode_of_the_umask(made, tmp_path, umask, file_mode, dir_mode):
    previous = os.umask(umask)
    try:
        folder = tmp_path / "teacher"
        made.teacher.save_pretrained(folder, training=made.training)
        assert set_evaluation(folder, "| synthmed | 4 |")  # the card rewritten by eval
        write_text_atomic(tmp_path / "report.md", "text")
        write_bytes_atomic(tmp_path / "data.bin", b"\0")
    finally:
        os.umask(previous)
    assert _files(folder) == TEACHER_FILES
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in files} == \
        {p.relative_to(tmp_path).as_posix(): file_mode for p in files}
    assert {p.name: p.stat().st_mode & 0o777 for p in (folder, folder / "adapter")} == \
        {"teacher": dir_mode, "adapter": dir_mode}


# --- the content hash -------------------------------------------------------------------------------------------------
def test_the_content_hash_follows_content_not_place_and_reads_windows_of_large_files(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "x"}')
    size = 6 * 2**20
    (folder / "weights.bin").write_bytes(bytes(size))
    digest = content_sha256(folder)
    copy = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(folder, copy)
    os.utime(copy / "weights.bin", (0, 0))
    (copy / ".cache").mkdir()
    (copy / ".cache" / "download.metadata").write_text("per download")  # hidden: not part of the content
    assert content_sha256(copy) == digest

    def changed(offset: int) -> str:
        with (copy / "weights.bin").open("r+b") as handle:
            handle.seek(offset)
            handle.write(b"\1")
        try:
            return content_sha256(copy)
        finally:
            with (copy / "weights.bin").open("r+b") as handle:
                handle.seek(offset)
                handle.write(b"\0")

    window = 2**20
    for offset in (0, (size - window) // 4 + 10, (size - window) // 2 + 10, 3 * (size - window) // 4 + 10, size - 1):
        assert changed(offset) != digest, offset  # every window is read
    assert changed(window + 10) == digest  # between windows: an identity check, not an integrity check
    with (copy / "weights.bin").open("r+b") as handle:
        handle.truncate(size - window)  # zeros everywhere: the windows read the same bytes, the size tells
    assert content_sha256(copy) != digest
    (copy / "weights.bin").write_bytes(bytes(size))
    assert content_sha256(copy) == digest
    (copy / "config.json").write_text('{"model_type": "y"}')
    assert content_sha256(copy) != digest
