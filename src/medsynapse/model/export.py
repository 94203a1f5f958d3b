"""`medsynapse export --model STUDENT --output OUT`: an encoder-free student as one self-contained folder.

What the folder holds is described in model/bundled.py. Plan:
1. refuse, before anything is loaded: a folder that is not an encoder-free student (no manifest, a teacher, a
   baseline, an export), an output that exists and is not an empty folder;
2. load the student as `predict` does: its base VLM found as model/bases.py describes, the LoRA folded into the
   weights (peft's merge_and_unload), A_psi;
3. write into a temporary folder beside OUT: the weights (safetensors only, A_psi under `memory.`), config.json with
   `auto_map`, the processor and tokenizer, the shipped modeling file, medsynapse.json (format 3) and the card (Hub
   front matter; scores from the card's evaluation section, which `medsynapse eval` fills);
4. give every file the umask's mode (safetensors writes 0600), fsync, and rename the folder into place: OUT is
   complete or absent, and a failed export leaves no temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import cast

from medsynapse.locking import fsync_tree, make_tree_readable, write_text_atomic, writes_into
from medsynapse.model.bases import BaseFolders
from medsynapse.model.bundled import (
    BUNDLED_FORMAT,
    MEMORY_PREFIX,
    MODEL_TYPE,
    MODELING_FILE,
    MODELING_MODULE,
    is_bundled,
)
from medsynapse.model.card import CARD, evaluation_results, hub_front_matter, render_export, training_files
from medsynapse.model.processor import LATENT_TOKEN, ModelNotFoundError

MODEL_CLASS, CONFIG_CLASS = "MedSynapseQwen3VLForConditionalGeneration", "MedSynapseQwen3VLConfig"
PROCESSOR_CLASS = "MedSynapseQwen3VLProcessor"
AUTO_MAP = {"AutoConfig": f"{MODELING_MODULE}.{CONFIG_CLASS}",
            "AutoModelForImageTextToText": f"{MODELING_MODULE}.{MODEL_CLASS}"}
PROCESSOR_AUTO_MAP = {"AutoProcessor": f"{MODELING_MODULE}.{PROCESSOR_CLASS}"}
SHIPPED_MODELING = Path(__file__).with_name("exported_modeling.py")


def export_student(folder: str | Path, output: str | Path, bases: BaseFolders | None = None,
                   license_id: str = "apache-2.0", datasets: list[str] | None = None) -> Path:
    """The student at `folder` exported to `output` (module docstring); returns `output`. `datasets`: the Hub ids
    of the training data for the card (default: the data files the student's training record names)."""
    from medsynapse.model.medsynapse import MedSynapseV

    folder, output = Path(folder), Path(output)
    manifest = student_manifest(folder)
    check_output(output)
    model = MedSynapseV.from_pretrained(folder, merge_adapter=True, bases=bases)
    source_card = (folder / CARD).read_text() if (folder / CARD).is_file() else ""
    output.parent.mkdir(parents=True, exist_ok=True)
    with writes_into(output.parent, "the export"):
        staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.export-"))
        try:
            write_folder(model, manifest, staging)
            write_text_atomic(staging / CARD, export_card(output.name, manifest, source_card, license_id, datasets))
            make_tree_readable(staging)
            fsync_tree(staging)
            os.replace(staging, output)  # onto an empty folder or none: atomic
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return output


# --- refusals --------------------------------------------------------------------------------------------------
def student_manifest(folder: Path) -> dict:
    """The manifest of an encoder-free student folder; anything else is refused with one line naming it."""
    from medsynapse.model.card import kind_of
    from medsynapse.model.medsynapse import MANIFEST

    path = folder / MANIFEST
    if not path.is_file():
        raise ModelNotFoundError(f"{folder}: not a MedSynapse model folder (no {MANIFEST}); export takes an "
                                 "encoder-free student (Stage III) folder")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelNotFoundError(f"{path}: not valid JSON ({err}); the model folder is damaged") from None
    if is_bundled(manifest):
        raise ValueError(f"{folder}: already an exported folder; copy it as it is")
    if not manifest.get("autonomous") or manifest.get("latent"):
        raise ValueError(f"{folder}: a {kind_of(manifest)} folder; export takes an encoder-free student (Stage III: "
                         "VLM + LoRA + A_psi)")
    return manifest


def check_output(output: Path) -> None:
    """The output must not exist, or be an empty folder."""
    if output.is_dir() and any(output.iterdir()):
        raise ValueError(f"{output}: exists and is not empty; export writes a new folder (give another --output, "
                         "or remove it)")
    if output.exists() and not output.is_dir():
        raise ValueError(f"{output}: exists and is not a folder; export writes a new folder")


# --- writing -----------------------------------------------------------------------------------------------------
def write_folder(model, manifest: dict, folder: Path) -> None:
    """Everything but the card: weights, configs, processor, the modeling file and medsynapse.json."""
    from medsynapse.model.medsynapse import MANIFEST

    write_weights(model, folder)
    write_config(model, folder)
    write_processor(model.processor, folder)
    shutil.copyfile(SHIPPED_MODELING, folder / MODELING_FILE)
    write_text_atomic(folder / MANIFEST, json.dumps(bundled_manifest(model, manifest), indent=2))


def write_weights(model, folder: Path) -> None:
    """The merged VLM's tensors and A_psi's (prefixed `memory.`), in safetensors, with generation_config.json."""
    if model.has_adapter:
        raise RuntimeError("the LoRA is still an adapter; export writes merged weights")
    state = dict(model.vlm.state_dict())
    state.update({MEMORY_PREFIX + key: value for key, value in model.autonomous.state_dict().items()})
    model.vlm.save_pretrained(folder, state_dict=state)


def write_config(model, folder: Path) -> None:
    """config.json as Qwen3-VL wrote it, plus what the shipped modeling file needs: the model type, architecture,
    `auto_map` and `medsynapse` (A_psi's config, the slot token, the tokens never generated)."""
    from medsynapse.model.vlm import structural_token_ids

    path = folder / "config.json"
    config = json.loads(path.read_text())
    tokenizer = model.processor.tokenizer
    config.update(model_type=MODEL_TYPE, architectures=[MODEL_CLASS], auto_map=AUTO_MAP,
                  medsynapse={"autonomous": model.autonomous.config.to_dict(),
                              "latent_token_id": tokenizer.convert_tokens_to_ids(LATENT_TOKEN),
                              "suppress_token_ids": structural_token_ids(tokenizer),
                              "answer_format": model.answer_format})
    write_text_atomic(path, json.dumps(config, indent=2, sort_keys=True))


def write_processor(processor, folder: Path) -> None:
    """The processor and tokenizer, naming the shipped image-only processor (AutoProcessor with
    trust_remote_code=True builds it; no torchvision needed)."""
    processor.save_pretrained(folder)
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            config = json.loads(path.read_text())
            config["processor_class"] = PROCESSOR_CLASS
            if name == "processor_config.json":
                config["auto_map"] = PROCESSOR_AUTO_MAP
            write_text_atomic(path, json.dumps(config, indent=2, sort_keys=True))


def bundled_manifest(model, manifest: dict) -> dict:
    """medsynapse.json of the export: format 3, A_psi's config, and the base it came from (name and content hash,
    for the record: nothing is searched)."""
    base = manifest.get("vlm")
    return {"format": BUNDLED_FORMAT, "vlm": "bundled", "encoder": None, "sampler": None, "adapter": None,
            "autonomous": model.autonomous.config.to_dict(), "reference_bank": None,
            "answer_format": model.answer_format, "latent": None,
            "base_vlm": {k: base[k] for k in ("name", "sha256")} if isinstance(base, dict) else base,
            "lora_merged": bool(manifest.get("adapter"))}


USAGE = """`medsynapse predict --model MODEL_DIR --image scan.png --question "Is there a lesion?"` (or `serve`, `eval`,
`app`; Python: `MedSynapseV.from_pretrained("MODEL_DIR")`). With transformers alone (this folder's
`modeling_medsynapse.py` adds the memory to Qwen3-VL, hence `trust_remote_code=True`):

```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

FOLDER, QUESTION = "MODEL_DIR", "Is there a lesion in this image? Answer yes or no."
processor = AutoProcessor.from_pretrained(FOLDER, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(FOLDER, trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
inputs = processor(text=[text], images=[Image.open("scan.png").convert("RGB")], return_tensors="pt")
tokens = model.generate(**inputs, max_new_tokens=16)  # greedy; the memory slots are added by the model
print(processor.decode(tokens[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""


def export_card(name: str, manifest: dict, source_card: str, license_id: str, datasets: list[str] | None) -> str:
    """README.md of the export: Hub front matter (base model, license, pipeline, tags, datasets, scores) and body."""
    base = manifest.get("vlm")
    base_model = cast(str, base.get("name")) if isinstance(base, dict) else Path(str(base)).name  # a record has one
    usage = USAGE.replace("MODEL_DIR", name)
    if manifest.get("answer_format") == "reasoning":
        usage += ("\n\nThis model was trained in the `reasoning` format: append MedSynapse's reasoning instruction "
                  "to the question (`medsynapse predict` does) and read the answer in `<answer></answer>`.")
    front = hub_front_matter(name, base_model, license_id, datasets or training_files(source_card),
                             evaluation_results(source_card))
    return render_export(front, {**manifest, "base_vlm": base}, source_card, usage)
