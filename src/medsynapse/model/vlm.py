"""Qwen3-VL with memory slots: loading, prompts, 3D M-RoPE positions, forward and generate with spliced memory.

Memory enters as N placeholder tokens (``<|latent|>``) placed after the question, at the start of the assistant turn,
before the answer. Their embedding rows are replaced by memory vectors; everything else is the model's own path:
pixels (or cached vision features) are always passed, so DeepStack runs, and explicit 4-row position ids from
``get_rope_index`` are always passed, so the image keeps its 2-D rotary layout. See DESIGN.md, decision 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

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


def load_processor(path: str | Path) -> ImageOnlyQwen3VLProcessor:
    folder = resolve_local_model(path)
    try:
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, AttributeError):
        # Folders saved by the stock Qwen3VLProcessor name a class we cannot build without torchvision.
        processor = ImageOnlyQwen3VLProcessor.from_pretrained(folder)
    if not isinstance(processor, Qwen3VLProcessor):
        # AutoProcessor silently returns a bare tokenizer for unknown processor classes (qwen3vl-recipes.md §7).
        processor = ImageOnlyQwen3VLProcessor.from_pretrained(folder)
    tok = processor.tokenizer
    if LATENT_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [LATENT_TOKEN]})
    processor.tokenizer.padding_side = "left"
    return processor


def load_vlm(path: str | Path, dtype: torch.dtype | str = "auto", trust_remote_code: bool = False,
             device: str | torch.device = "cpu") -> tuple[Qwen3VLForConditionalGeneration, ImageOnlyQwen3VLProcessor]:
    """Load Qwen3-VL and its processor from a local folder (tiny test model or Qwen3-VL-8B alike)."""
    folder = resolve_local_model(path)
    processor = load_processor(folder)
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True)
    latent_id = processor.tokenizer.convert_tokens_to_ids(LATENT_TOKEN)
    if latent_id >= model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(processor.tokenizer))
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model.to(device), processor


@dataclass
class PromptBatch:
    """A left-padded batch ready for the VLM; `labels` is -100 except on answer tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    labels: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> PromptBatch:
        def move(t):
            return None if t is None else t.to(device)

        return PromptBatch(*(move(getattr(self, name)) for name in self.__dataclass_fields__))


@dataclass
class EncodedPrompt:
    """One sample's processor output (unpadded); cached by datasets so images are processed once."""

    input_ids: torch.Tensor  # (L,)
    mm_token_type_ids: torch.Tensor  # (L,)
    pixel_values: torch.Tensor  # (patches, D)
    image_grid_thw: torch.Tensor  # (n_images, 3)
    answer_ids: torch.Tensor  # (A,) empty at inference


class PromptBuilder:
    """Chat prompts with N memory slots between question and answer, using the model's own chat template."""

    def __init__(self, processor: ImageOnlyQwen3VLProcessor, n_memory: int):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.n_memory = n_memory
        self.latent_id = self.tokenizer.convert_tokens_to_ids(LATENT_TOKEN)
        self.eos_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def prompt_text(self, question: str, n_images: int) -> str:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)
        return text + LATENT_TOKEN * self.n_memory

    def encode(self, images: list[Image.Image], question: str, answer: str | None = None) -> EncodedPrompt:
        enc = self.processor(text=[self.prompt_text(question, len(images))], images=images, return_tensors="pt")
        if answer is None:
            answer_ids = torch.zeros(0, dtype=torch.long)
        else:
            ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            answer_ids = torch.tensor([*ids, self.eos_id], dtype=torch.long)
        return EncodedPrompt(enc["input_ids"][0], enc["mm_token_type_ids"][0], enc["pixel_values"],
                             enc["image_grid_thw"], answer_ids)

    def collate(self, items: list[EncodedPrompt], with_answers: bool | None = None) -> PromptBatch:
        """Left-pad prompts (+ answers when present) into one batch."""
        if with_answers is None:
            with_answers = all(len(item.answer_ids) > 0 for item in items)
        seqs = [torch.cat([it.input_ids, it.answer_ids]) if with_answers else it.input_ids for it in items]
        length = max(len(s) for s in seqs)
        pad_id = self.tokenizer.pad_token_id
        batch = len(items)
        input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
        attention = torch.zeros((batch, length), dtype=torch.long)
        mm_types = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        for row, (item, seq) in enumerate(zip(items, seqs)):
            start = length - len(seq)
            input_ids[row, start:] = seq
            attention[row, start:] = 1
            mm_types[row, start:start + len(item.mm_token_type_ids)] = item.mm_token_type_ids
            if with_answers:
                labels[row, length - len(item.answer_ids):] = item.answer_ids
        return PromptBatch(input_ids, attention, mm_types, torch.cat([it.pixel_values for it in items]),
                           torch.cat([it.image_grid_thw for it in items]), labels if with_answers else None)


def position_ids_for(model: Qwen3VLForConditionalGeneration, batch: PromptBatch) -> torch.Tensor:
    """4-row position ids: row 0 the text position for the causal mask, rows 1-3 the M-RoPE t/h/w indices."""
    pos3, _ = model.model.get_rope_index(batch.input_ids, batch.mm_token_type_ids,
                                         image_grid_thw=batch.image_grid_thw, attention_mask=batch.attention_mask)
    mask = batch.attention_mask.long()
    text = ((mask.cumsum(-1) - 1).clamp(min=0) * mask)[None]
    return torch.cat([text.to(pos3.dtype), pos3])


def splice_memory(model: Qwen3VLForConditionalGeneration, input_ids: torch.Tensor, memory: torch.Tensor | None,
                  latent_id: int) -> torch.Tensor:
    """Input embeddings with the latent slots' rows replaced by `memory` (B, N, H), ordered (sample, slot)."""
    embeds = model.get_input_embeddings()(input_ids)
    if memory is None:
        return embeds
    slots = input_ids == latent_id
    per_row = slots.sum(dim=1)
    if not bool((per_row == memory.shape[1]).all()):
        raise ValueError(f"every row needs exactly {memory.shape[1]} memory slots, found {per_row.tolist()}")
    return embeds.masked_scatter(slots.unsqueeze(-1), memory.to(embeds.dtype))


def vision_features(model: Qwen3VLForConditionalGeneration, batch: PromptBatch):
    """The vision tower's output for a batch; pass it back as `mm_encoder_outputs` to skip re-encoding."""
    return model.model.get_image_features(batch.pixel_values, batch.image_grid_thw, return_dict=True)


def _vision_kwargs(batch: PromptBatch, features) -> dict:
    if features is None:
        return {"pixel_values": batch.pixel_values, "image_grid_thw": batch.image_grid_thw}
    return {"mm_encoder_outputs": {"image": features}, "image_grid_thw": batch.image_grid_thw}


def forward_with_memory(model, batch: PromptBatch, memory: torch.Tensor | None, latent_id: int,
                        features=None, labels: torch.Tensor | None = None, **kwargs):
    """One forward pass with memory spliced into the slots (memory None = plain placeholder embeddings)."""
    embeds = splice_memory(model, batch.input_ids, memory, latent_id)
    return model(inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=position_ids_for(model, batch),
                 labels=labels, **_vision_kwargs(batch, features), **kwargs)


@torch.no_grad()
def generate_with_memory(model, batch: PromptBatch, memory: torch.Tensor | None, latent_id: int,
                         max_new_tokens: int = 16, features=None, **generate_kwargs) -> torch.Tensor:
    """Cached generation from spliced embeddings; returns only the new tokens (B, T).

    Route B of qwen3vl-recipes.md §8: embeddings + explicit 4-row positions, which `generate` extends by one per step.
    """
    embeds = splice_memory(model, batch.input_ids, memory, latent_id)
    generate_kwargs.setdefault("do_sample", False)
    return model.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                          position_ids=position_ids_for(model, batch), max_new_tokens=max_new_tokens,
                          suppress_tokens=[latent_id], **_vision_kwargs(batch, features), **generate_kwargs)
