"""The model card every saved MedSynapse folder carries (README.md): what the folder is, what it was built from, how
it was trained, how it scored, and what it is not. Written by `MedSynapseV.save_pretrained` from the folder's
manifest and the training record a recipe passes; `medsynapse eval` adds its table (`set_evaluation`). The folder
stays loadable as before: nothing reads README.md back. The card names no absolute path (a folder is copied between
machines): the bases appear by name and content hash, and any absolute path in the training record by its last
component.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medsynapse.locking import write_text_atomic

CARD = "README.md"
EVALUATION_START, EVALUATION_END = "<!-- evaluation -->", "<!-- /evaluation -->"

LIMITATIONS = ("A research model, **not a medical device**: not validated for diagnosis, triage or any clinical "
               "decision, on any population. Its answers can be wrong with high confidence. Trained on the data "
               "named above only; performance on other scanners, sites, modalities or patients is unknown.")


def kind_of(manifest: dict) -> str:
    """What the folder holds, from its manifest."""
    if manifest.get("latent"):
        return f"latent-reasoning baseline ({manifest['latent'].get('method')})"
    if manifest.get("autonomous"):
        return "MedSynapse-V encoder-free student (Stage III: VLM + LoRA + A_psi)"
    if manifest.get("sampler") and manifest.get("adapter"):
        return "MedSynapse-V teacher (Stage II: VLM + LoRA + prior encoder + P_phi)"
    if manifest.get("sampler"):
        return "MedSynapse-V Stage I (VLM + prior encoder + P_phi)"
    if manifest.get("adapter"):
        return "VLM + LoRA, no memory (a baseline)"
    return "plain VLM"


def base_line(entry: str | dict | None) -> str:
    """A manifest's base as the card shows it: `name` (sha256 `...`); a format-1 path by its folder name."""
    if entry is None:
        return "none"
    if isinstance(entry, dict):
        return f"`{entry.get('name')}` (content sha256 `{entry.get('sha256')}`)"
    return f"`{Path(entry).name}`"


def portable(value):
    """`value` with every absolute path string replaced by its last component (lists and dicts walked)."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [portable(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return Path(value).name
    return value


def render(manifest: dict, training: dict | None, evaluation: str | None) -> str:
    lines = ["---", "library_name: medsynapse", "tags: [medical-vqa, vision-language, research-only]", "---", "",
             f"# {kind_of(manifest)}", "",
             f"- base VLM: {base_line(manifest.get('vlm'))}",
             f"- prior encoder: {base_line(manifest.get('encoder'))}",
             f"- answer format: {manifest.get('answer_format', 'direct')}",
             "- load: `MedSynapseV.from_pretrained(FOLDER)`; `medsynapse predict | eval | serve | app --model FOLDER`",
             "", "## Training", ""]
    if training:
        training = portable(training)
        lines += [f"- recipe: `{training.get('recipe')}`", f"- config hash: `{training.get('config_hash')}`",
                  f"- trained from: `{training.get('source')}`", "", "<details><summary>settings</summary>", "",
                  "```json", json.dumps(training.get("settings", {}), indent=2, sort_keys=True), "```", "",
                  "</details>"]
    else:
        lines.append("No training record (saved outside a recipe).")
    lines += ["", "## Evaluation", "", EVALUATION_START, evaluation or "Not evaluated yet: `medsynapse eval "
              "--model FOLDER ...` adds its table here.", EVALUATION_END, "", "## Intended use and limitations", "",
              "Research on medical vision-language models: reproducing and testing MedSynapse-V (arXiv 2604.26283). "
              + LIMITATIONS, ""]
    return "\n".join(lines)


def write_card(folder: str | Path, manifest: dict, training: dict | None = None) -> None:
    """README.md for a freshly saved folder (an evaluation table already there is kept)."""
    path = Path(folder) / CARD
    _write(path, render(manifest, training, _evaluation_in(path)))


def set_evaluation(folder: str | Path, table: str) -> bool:
    """Put `table` (markdown) in the card's evaluation section; False when the folder has no card to update (a
    plain VLM folder is not ours to write into)."""
    path = Path(folder) / CARD
    if not path.is_file() or EVALUATION_START not in path.read_text():
        return False
    text = path.read_text()
    head, _, rest = text.partition(EVALUATION_START)
    _, _, tail = rest.partition(EVALUATION_END)
    _write(path, f"{head}{EVALUATION_START}\n{table.strip()}\n{EVALUATION_END}{tail}")
    return True


def _evaluation_in(path: Path) -> str | None:
    if not path.is_file():
        return None
    text = path.read_text()
    if EVALUATION_START not in text:
        return None
    inside = text.partition(EVALUATION_START)[2].partition(EVALUATION_END)[0].strip()
    return None if inside.startswith("Not evaluated yet") else inside


def _write(path: Path, text: str) -> None:
    write_text_atomic(path, text)  # fsynced, renamed into place, the umask's mode (not mkstemp's 0600)


# --- the card of an exported folder (model/export.py): Hub front matter, then the student's own sections -----------
EVALUATION_HEADER = "| benchmark | questions | accuracy | unparseable |"  # the table `medsynapse eval` writes
TRAINING_SECTION, EVALUATION_SECTION, LIMITS_SECTION = "## Training", "## Evaluation", "## Intended use and limitations"
HUB_TAGS = ["medsynapse", "medical-vqa", "vision-language", "qwen3_vl", "custom_code", "research-only"]


def evaluation_results(text: str) -> list[dict]:
    """The benchmarks' scores in a card's evaluation section, as `medsynapse eval` wrote them: [{benchmark,
    questions, accuracy}] (a benchmark without an accuracy is left out); [] when it was never evaluated."""
    inside = text.partition(EVALUATION_START)[2].partition(EVALUATION_END)[0]
    if EVALUATION_HEADER not in inside:
        return []
    results = []
    for line in inside.partition(EVALUATION_HEADER)[2].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 4 or set(cells[0]) <= {"-"}:
            continue
        try:
            results.append({"benchmark": cells[0], "questions": int(cells[1]), "accuracy": float(cells[2])})
        except ValueError:  # "—": not scorable
            continue
    return results


def training_files(text: str) -> list[str]:
    """The data files a card's training record names (its settings' `*_file` values), in order, each once."""
    block = text.partition(TRAINING_SECTION)[2].partition("```json")[2].partition("```")[0]
    try:
        settings = json.loads(block) if block.strip() else {}
    except json.JSONDecodeError:
        return []
    names = [str(value) for key, value in sorted(settings.items()) if key.endswith("_file") and value]
    return list(dict.fromkeys(names))


def model_index_result(result: dict) -> dict:
    """One benchmark's score as a `model-index` result."""
    return {"task": {"type": "visual-question-answering", "name": "Visual Question Answering"},
            "dataset": {"name": result["benchmark"], "type": result["benchmark"]},
            "metrics": [{"type": "accuracy", "value": result["accuracy"],
                         "name": f"accuracy ({result['questions']} questions)"}]}


def hub_front_matter(name: str, base_model: str, license_id: str, datasets: list[str],
                     results: list[dict]) -> str:
    """The YAML front matter the Hugging Face Hub reads: base model, license, pipeline, tags, datasets and, when
    evaluated, `metrics` and a `model-index` with each benchmark's accuracy."""
    import yaml

    meta: dict[str, Any] = {"base_model": base_model, "base_model_relation": "finetune", "license": license_id,
                            "library_name": "transformers", "pipeline_tag": "image-text-to-text", "tags": HUB_TAGS,
                            "datasets": datasets}
    if results:
        meta["metrics"] = ["accuracy"]
        meta["model-index"] = [{"name": name, "results": [model_index_result(r) for r in results]}]
    return f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)}---\n"


def section(text: str, heading: str) -> str:
    """A card's `## ...` section, heading included, up to the next one ('' when absent)."""
    if heading not in text:
        return ""
    body = text.partition(heading)[2]
    end = body.find("\n## ")
    return heading + (body if end < 0 else body[:end]).rstrip() + "\n"


def render_export(front_matter: str, manifest: dict, source_card: str, usage: str) -> str:
    """An exported folder's card: front matter, what it is and how to load it, then the student's own training and
    evaluation sections as its card had them, and the limitations."""
    lines = [front_matter, f"# {kind_of(manifest)}, exported", "",
             "Self-contained: the base VLM with the Stage II LoRA merged into its weights, A_psi (the encoder-free "
             "memory), the processor and this card. No prior encoder, no MedSynapse cache and no other folder are "
             "needed.", "",
             f"- base VLM: {base_line(manifest.get('base_vlm'))} (merged into this folder's weights)",
             f"- answer format: {manifest.get('answer_format', 'direct')}", "", "## Use", "", usage.strip(), ""]
    for heading in (TRAINING_SECTION, EVALUATION_SECTION):
        lines.append(section(source_card, heading) or f"{heading}\n\nNot recorded.\n")
    lines += [LIMITS_SECTION, "", "Research on medical vision-language models: reproducing and testing MedSynapse-V "
              "(arXiv 2604.26283). " + LIMITATIONS, ""]
    return "\n".join(lines)
