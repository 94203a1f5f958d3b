"""Loading a local Qwen3-VL folder's processor without torchvision, with the memory placeholder token.

Kept apart from `vlm.py` (the forward, generate and scoring maths) so that tools which rewrite functions, such as the
mutation tester, never touch the processor class: transformers reads a processor's attributes from its `__init__`
signature.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoProcessor, Qwen3VLConfig, Qwen3VLProcessor

LATENT_TOKEN = "<|latent|>"


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3-VL processor without the video processor.

    The stock processor cannot be built without torchvision (its video processor needs it); the attribute list of a
    processor is read from its ``__init__`` signature, so dropping the argument is what makes it image-only.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)


AutoProcessor.register(Qwen3VLConfig, ImageOnlyQwen3VLProcessor, exist_ok=True)


class ModelNotFoundError(FileNotFoundError):
    """A model path that is not a local folder: MedSynapse never downloads at run time."""


def resolve_local_model(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelNotFoundError(
            f"model '{path}' is not a local folder. MedSynapse loads models only from local directories "
            "(no hub access at run time): download the checkpoint yourself, e.g. with `hf download "
            f"{path} --local-dir DIR`, and pass DIR.")
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{folder}: no config.json; not a Hugging Face model folder")
    return folder


def load_processor(path: str | Path, config: Qwen3VLConfig | None = None) -> ImageOnlyQwen3VLProcessor:
    """The folder's processor, image-only, with the memory token, left-padding. `config`: the model's config, given
    when the folder's config.json is not the stock Qwen3-VL's (an exported folder names its own model type and
    processor class, which the Auto classes would ask permission to run): the image-only class is then built
    directly from the folder's files, never through AutoProcessor."""
    folder = resolve_local_model(path)
    if config is not None:
        processor = ImageOnlyQwen3VLProcessor.from_pretrained(folder, config=config)
    else:
        try:
            processor = AutoProcessor.from_pretrained(folder)
        except (OSError, ValueError, AttributeError, ImportError):
            # Folders saved by the stock Qwen3VLProcessor name a class we cannot build without torchvision (with a
            # video_preprocessor_config.json, transformers raises ImportError for the video processor).
            processor = ImageOnlyQwen3VLProcessor.from_pretrained(folder)
    if not isinstance(processor, Qwen3VLProcessor):
        # AutoProcessor silently returns a bare tokenizer for unknown processor classes (qwen3vl-recipes.md §7).
        processor = ImageOnlyQwen3VLProcessor.from_pretrained(folder)
    tok = processor.tokenizer
    if LATENT_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [LATENT_TOKEN]})
    processor.tokenizer.padding_side = "left"
    return processor
