"""`medsynapse export`: a tiny encoder-free student (a LoRA that changes its answers, an attention-pooling A_psi)
exported, the folder copied elsewhere and its bases put out of reach, `$MEDSYNAPSE_CACHE` an empty folder; then
`MedSynapseV` / `medsynapse predict`, a `medsynapse serve` process and plain transformers with
`trust_remote_code=True` (a process that never imports MedSynapse) all give the student's own greedy tokens. The
folder is safetensors only, with the umask's modes and no absolute path; the card carries Hub front matter with the
scores `medsynapse eval` recorded; a failed export leaves nothing; what is not a student, or an output that exists and
is not empty, is one line."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
import yaml
from serving import free_port as _free_port
from serving import spawn as _spawn
from serving import tail as _tail
from test_serve import CHAT, _body, _data_uri

from medsynapse.cli import main
from medsynapse.data.images import load_image
from medsynapse.data.schema import read_samples
from medsynapse.eval.runner import record_in_card
from medsynapse.locking import current_umask
from medsynapse.model.bases import BaseFolders
from medsynapse.model.export import export_card, export_student
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.memory import AutonomousConfig, AutonomousMemoryModule, embedding_rms

pytestmark = pytest.mark.slow

VLM = "vlm_base-tiny"
NEW_TOKENS = 8
SCORES = {"vqa-rad": {"accuracy": 0.625, "n": 8, "unparseable": 0}, "slake": {"accuracy": 0.5, "n": 4,
                                                                               "unparseable": 1}}


def _student(vlm: Path) -> MedSynapseV:
    """The VLM with a LoRA whose B is large enough to change the greedy answers, and an attention-pooling A_psi."""
    torch.manual_seed(0)
    model = MedSynapseV.build(str(vlm), None, n_memory=0, dtype="float32")
    model.add_lora(4, 8, 0.0, ["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.vlm.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    torch.manual_seed(2)
    config = AutonomousConfig(hidden_size=128, n_memory=4, pooling="attention", attention_dim=16,
                              embed_rms=embedding_rms(model.vlm.get_input_embeddings()))
    return MedSynapseV(model.vlm, model.processor, vlm_path=str(vlm), autonomous=AutonomousMemoryModule(config))


def _tokens(model: MedSynapseV, images, questions) -> list[list[int]]:
    """Greedy new tokens of each question alone, as `predict` generates them (EOS and what follows it dropped)."""
    out = []
    for image, question in zip(images, questions):
        tokens = model.generate_encoded([model.prompts.encode([image], question)], [image], NEW_TOKENS)[0].tolist()
        out.append(tokens[: tokens.index(model.prompts.eos_id) + 1] if model.prompts.eos_id in tokens else tokens)
    return out


@pytest.fixture(scope="module")
def made(tiny_env, tmp_path_factory):
    """A student saved with its base under `orig/`, its eval scores recorded in its card as `medsynapse eval` records
    them, its tokens; exported to orig/export, then copied to `machine/` and the base moved out of every place the
    search path looks."""
    root = tmp_path_factory.mktemp("orig")
    vlm = root / "bases" / VLM
    shutil.copytree(tiny_env.vlm, vlm)
    student = root / "models" / "student"
    training = {"recipe": "stage3", "config_hash": "0123456789abcdef", "source": str(vlm),
                "settings": {"train_file": str(tiny_env.train_file), "lr": 1e-3}}
    _student(vlm).save_pretrained(student, training=training)
    record_in_card(str(student), SCORES, root / "eval")
    samples = [s for s in read_samples(tiny_env.test_file) if s.answer_type != "caption"][:3]
    images = [load_image(s.images[0], s) for s in samples]
    questions = [s.question for s in samples]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDSYNAPSE_CACHE", str(root / "bases"))
        reference = MedSynapseV.from_pretrained(student, merge_adapter=True)  # as predict loads it
        tokens = _tokens(reference, images, questions)
        batched = reference.generate_encoded([reference.prompts.encode([i], q) for i, q in zip(images, questions)],
                                             images, NEW_TOKENS)
        answers = reference.answer(images, questions, max_new_tokens=NEW_TOKENS)
        export_student(student, root / "export")
    machine = tmp_path_factory.mktemp("machine")
    copy = machine / "models" / "tiny-student"
    shutil.copytree(root / "export", copy)
    (root / "bases").rename(root / "hidden")  # no base anywhere the student's search path looks
    (machine / "empty_cache").mkdir()
    return SimpleNamespace(root=root, student=student, vlm=root / "hidden" / VLM, copy=copy, samples=samples,
                           images=images, questions=questions, tokens=tokens, batched=batched, answers=answers,
                           cache=machine / "empty_cache", machine=machine, reference=reference)


def test_the_lora_and_a_psi_change_the_tokens_so_equal_tokens_mean_something(made):
    """Without the merged LoRA, or with A_psi's memory zeroed, the student's tokens differ: an export that dropped
    either would not pass the comparisons below."""
    model = made.reference
    assert len({tuple(t) for t in made.tokens}) > 1  # different questions, different answers
    unmerged = MedSynapseV.from_pretrained(made.student, bases=BaseFolders(vlm=str(made.vlm)))
    with unmerged.vlm.disable_adapter():
        assert _tokens(unmerged, made.images, made.questions) != made.tokens
    items = [model.prompts.encode([i], q) for i, q in zip(made.images, made.questions)]
    zeroed = model.generate_encoded(items, made.images, NEW_TOKENS, memory_transform=torch.zeros_like)
    assert not torch.equal(zeroed, made.batched)


def test_the_copied_export_answers_token_for_token_with_an_empty_cache(made, monkeypatch, capsys):
    monkeypatch.setenv("MEDSYNAPSE_CACHE", str(made.cache))
    with pytest.raises(Exception, match="was not found"):  # the student itself cannot load here any more
        MedSynapseV.from_pretrained(made.student)
    model = MedSynapseV.from_pretrained(made.copy)
    assert model.encoder is None and model.sampler is None and not model.has_adapter
    assert _tokens(model, made.images, made.questions) == made.tokens
    image = made.root / "scan.png"
    made.images[0].save(image)
    code = main(["predict", "--model", str(made.copy), "--image", str(image), "--question", made.questions[0],
                 "--max-new-tokens", str(NEW_TOKENS)])
    assert code == 0
    assert capsys.readouterr().out.strip() == made.answers[0]


PLAIN = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

job = json.loads(sys.argv[1])
processor = AutoProcessor.from_pretrained(job["folder"], trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(job["folder"], trust_remote_code=True).eval()
texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                       add_generation_prompt=True, tokenize=False) for q in job["questions"]]
images = [Image.open(path).convert("RGB") for path in job["images"]]
alone = []
for text, image in zip(texts, images):
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    alone.append(model.generate(**inputs, max_new_tokens=job["new"])[0, inputs["input_ids"].shape[1]:].tolist())
inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
batched = model.generate(**inputs, max_new_tokens=job["new"])[:, inputs["input_ids"].shape[1]:].tolist()
print(json.dumps({"alone": alone, "batched": batched, "class": type(model).__name__,
                  "medsynapse": sorted(m for m in sys.modules if m.startswith("medsynapse"))}))
"""


def test_plain_transformers_with_trust_remote_code_gives_the_same_tokens(made, tmp_path):
    """A process that never imports MedSynapse (no src on its path), its module cache in the test's folder."""
    images = []
    for number, image in enumerate(made.images):
        images.append(str(tmp_path / f"{number}.png"))
        image.save(images[-1])
    job = {"folder": str(made.copy), "questions": made.questions, "images": images, "new": NEW_TOKENS}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), MEDSYNAPSE_CACHE=str(made.cache), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", PLAIN, json.dumps(job)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["medsynapse"] == [] and result["class"] == "MedSynapseQwen3VLForConditionalGeneration"
    eos = made.reference.prompts.eos_id
    alone = [t[: t.index(eos) + 1] if eos in t else t for t in result["alone"]]
    assert alone == made.tokens  # token for token, each question alone
    assert result["batched"] == made.batched.tolist()  # the three questions as one left-padded batch


def test_a_serve_process_on_the_copy_answers_the_same(made, tmp_path):
    port = _free_port()
    command = [sys.executable, "-c", "from medsynapse.cli import main; raise SystemExit(main())", "serve",
               "--model", str(made.copy), "--port", str(port), "--max-wait-ms", "50"]
    log = tmp_path / "server.log"
    server = _spawn(command, log, MEDSYNAPSE_CACHE=str(made.cache))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            for _ in range(600):
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            else:
                pytest.fail(f"the server did not start:\n{_tail(log)}")
            assert client.get("/v1/models").json()["data"][0]["memory"] == "autonomous"
            replies = []
            for number, (image, question) in enumerate(zip(made.images, made.questions)):
                path = tmp_path / f"{number}.png"
                image.save(path)
                replies.append(client.post(CHAT, json=_body(_data_uri(path), question, max_tokens=NEW_TOKENS)))
        assert [r.status_code for r in replies] == [200] * len(replies), replies[0].text
        assert [r.json()["choices"][0]["message"]["content"] for r in replies] == made.answers
    finally:
        server.terminate()
        server.wait(timeout=30)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_the_folder_is_safetensors_only_portable_and_readable(made):
    names = {p.relative_to(made.copy).as_posix() for p in _files(made.copy)}
    assert {"config.json", "model.safetensors", "modeling_medsynapse.py", "medsynapse.json", "README.md",
            "processor_config.json", "tokenizer.json", "generation_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    for path in _files(made.root / "export"):  # as written, under this process's umask
        assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask(), path
        if path.suffix in (".json", ".md", ".py", ".jinja"):
            text = path.read_text()
            assert str(made.root) not in text and str(made.machine) not in text, path  # no absolute path
    config = json.loads((made.copy / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == \
        "modeling_medsynapse.MedSynapseQwen3VLForConditionalGeneration"
    assert config["medsynapse"]["autonomous"]["n_memory"] == 4
    shipped = ast.parse((made.copy / "modeling_medsynapse.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(shipped) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(shipped) if isinstance(node, ast.ImportFrom)}
    assert imported == {"__future__", "torch", "transformers"}  # nothing of MedSynapse


def test_the_card_has_hub_front_matter_with_the_recorded_scores(made):
    card = (made.copy / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == VLM and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "image-text-to-text" and "medical-vqa" in meta["tags"]
    assert meta["datasets"] == ["train.jsonl"]  # the training record's data file, by name
    results = {r["dataset"]["name"]: r["metrics"][0]["value"] for r in meta["model-index"][0]["results"]}
    assert results == {name: round(s["accuracy"], 3) for name, s in SCORES.items()}
    assert meta["metrics"] == ["accuracy"] and meta["model-index"][0]["name"] == "export"
    assert "trust_remote_code=True" in card and "not a medical device" in card
    student_card = (made.student / "README.md").read_text()
    manifest = json.loads((made.student / "medsynapse.json").read_text())
    unevaluated = student_card.split("<!-- evaluation -->")[0] + "<!-- evaluation -->\n<!-- /evaluation -->"
    other = yaml.safe_load(export_card("x", manifest, unevaluated, "mit", ["org/synthmed"]).split("---\n")[1])
    assert other["license"] == "mit" and other["datasets"] == ["org/synthmed"]
    assert "model-index" not in other and "metrics" not in other  # not evaluated: no scores claimed


def test_a_failed_export_leaves_nothing_and_modes_follow_the_umask(made, tmp_path, monkeypatch):
    import medsynapse.model.export as export

    bases = BaseFolders(vlm=str(made.vlm))

    def broken(processor, folder):
        raise RuntimeError("disk trouble halfway")

    with monkeypatch.context() as patch:
        patch.setattr(export, "write_processor", broken)
        with pytest.raises(RuntimeError, match="halfway"):
            export_student(made.student, tmp_path / "out", bases=bases)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary folder
    old = os.umask(0o027)
    try:
        (tmp_path / "out").mkdir()  # an empty output folder is fine
        export_student(made.student, tmp_path / "out", bases=bases)
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert {p.stat().st_mode & 0o777 for p in _files(tmp_path / "out")} == {0o640}
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_what_is_not_a_student_and_a_used_output_are_one_line(made, tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "medsynapse.json").write_text(json.dumps({"format": 2, "vlm": {"name": VLM, "sha256": "0" * 64},
                                                        "sampler": {"n_memory": 4}, "adapter": "adapter"}))
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    cases = {plain: (tmp_path / "a", "not a MedSynapse model folder"),
             teacher: (tmp_path / "b", "teacher (Stage II"),
             made.copy: (tmp_path / "c", "already an exported folder"),
             made.student: (used, "exists and is not empty")}
    for model, (output, words) in cases.items():  # the student's base given: only the output is wrong
        assert main(["export", "--model", str(model), "--output", str(output), "--vlm", str(made.vlm)]) == 2
        line = _one_line(capsys)
        assert line.startswith("medsynapse export: error:") and words in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "teacher", "used"]  # nothing written
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match="exists and is not empty"):
        main(["export", "--model", str(made.student), "--output", str(used), "--debug"])


def test_export_on_the_command_line_puts_the_license_and_datasets_in_the_card(made, tmp_path, monkeypatch, capsys):
    from medsynapse.cli import main

    monkeypatch.setenv("MEDSYNAPSE_CACHE", str(made.vlm.parent))  # where the student's base now is
    out = tmp_path / "card"
    assert main(["export", "--model", str(made.student), "--output", str(out), "--license", "mit", "--dataset",
                 "org/synthmed", "--dataset", "org/other"]) == 0
    meta = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert meta["license"] == "mit" and meta["datasets"] == ["org/synthmed", "org/other"]
