"""MedSynapseV: the VLM, the prior encoder and the memory sampler composed; memory per branch; save / load.

A saved folder holds `medsynapse.json` (what to load and how) and the trained memory weights in safetensors. The VLM
and the encoder are referenced by path (an 8B VLM is not copied into every stage folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from medsynapse.model.encoders import PriorEncoder, PriorOutput, load_encoder
from medsynapse.model.memory import DiagnosticMemorySampler, SamplerConfig, embedding_rms
from medsynapse.model.vlm import (
    PromptBatch,
    PromptBuilder,
    core_vlm,
    forward_with_memory,
    generate_with_memory,
    load_vlm,
)

BRANCHES = ("privileged", "counterfactual")
INTERVENTIONS = ("zero", "drop")
MANIFEST = "medsynapse.json"
ADAPTER_DIR = "adapter"


def lora_target_regex(projections: list[str]) -> str:
    """Restrict LoRA to the language model's layers (vision blocks use other names, but be explicit)."""
    return rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(projections)})"


class MedSynapseV(nn.Module):
    """VLM + optional prior encoder E_ana + optional sampler P_phi. Without a sampler it is the plain base VLM."""

    def __init__(self, vlm, processor, encoder: PriorEncoder | None = None,
                 sampler: DiagnosticMemorySampler | None = None, vlm_path: str | None = None,
                 encoder_path: str | None = None):
        super().__init__()
        self.vlm = vlm
        self.processor = processor
        self.encoder = encoder
        self.sampler = sampler
        self.vlm_path, self.encoder_path = vlm_path, encoder_path
        self.n_memory = sampler.config.n_memory if sampler is not None else 0
        self.prompts = PromptBuilder(processor, self.n_memory)
        self.latent_id = self.prompts.latent_id
        if encoder is not None:
            encoder.eval().requires_grad_(False)

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, vlm_path: str, encoder_path: str | None = None, n_memory: int = 16, width: int = 256,
              layers: int = 2, heads: int = 4, seed: int = 0, dtype: str = "auto") -> MedSynapseV:
        """A fresh model for Stage I: loaded VLM and encoder, newly initialised sampler."""
        vlm, processor = load_vlm(vlm_path, dtype=dtype)
        encoder = load_encoder(encoder_path) if encoder_path else None
        sampler = None
        if encoder is not None and n_memory > 0:
            torch.manual_seed(seed)
            sampler = DiagnosticMemorySampler(SamplerConfig(
                prior_dim=encoder.feature_dim, hidden_size=vlm.config.text_config.hidden_size, n_memory=n_memory,
                width=width, layers=layers, heads=heads, embed_rms=embedding_rms(vlm.get_input_embeddings())))
        return cls(vlm, processor, encoder, sampler, str(vlm_path), encoder_path)

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.vlm, "peft_config")

    def add_lora(self, r: int, alpha: int, dropout: float, projections: list[str]) -> None:
        """Wrap the VLM with a fresh peft LoRA on the language model (Stage II); only the adapter trains."""
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                            target_modules=lora_target_regex(projections))
        self.vlm = get_peft_model(self.vlm, config)

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {"format": 1, "vlm": str(Path(self.vlm_path).resolve()),
                    "encoder": str(Path(self.encoder_path).resolve()) if self.encoder_path else None,
                    "sampler": self.sampler.config.to_dict() if self.sampler is not None else None,
                    "adapter": ADAPTER_DIR if self.has_adapter else None}
        if self.has_adapter:
            self.vlm.save_pretrained(folder / ADAPTER_DIR)  # adapter_config.json + adapter_model.safetensors
        if self.sampler is not None:
            state = {k: v.detach().contiguous() for k, v in self.sampler.state_dict().items()}
            save_file(state, str(folder / "sampler.safetensors.tmp"))
            (folder / "sampler.safetensors.tmp").replace(folder / "sampler.safetensors")
        tmp = folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        tmp.replace(folder / MANIFEST)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: str = "auto") -> MedSynapseV:
        """A MedSynapse folder, or a plain local Qwen3-VL folder (loaded as the base model, no memory)."""
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            vlm, processor = load_vlm(folder, dtype=dtype)
            return cls(vlm, processor, vlm_path=str(folder))
        manifest = json.loads((folder / MANIFEST).read_text())
        vlm, processor = load_vlm(manifest["vlm"], dtype=dtype)
        encoder = load_encoder(manifest["encoder"]) if manifest.get("encoder") else None
        sampler = None
        if manifest.get("sampler"):
            sampler = DiagnosticMemorySampler(SamplerConfig(**manifest["sampler"]))
            sampler.load_state_dict(load_file(str(folder / "sampler.safetensors")))
        if manifest.get("adapter"):
            from peft import PeftModel

            vlm = PeftModel.from_pretrained(vlm, folder / manifest["adapter"], is_trainable=False)
        model = cls(vlm, processor, encoder, sampler, manifest["vlm"], manifest.get("encoder"))
        return model.eval()

    # --- memory -------------------------------------------------------------------------------------------------
    def prior(self, images: list[Image.Image]) -> PriorOutput:
        """E_ana on one image per sample, without gradients (the encoder is frozen)."""
        if self.encoder is None:
            raise ValueError("this model has no prior encoder")
        with torch.no_grad():
            return self.encoder.encode(images)

    def memory(self, prior: PriorOutput, branch: str = "privileged", intervention: str = "zero") -> torch.Tensor:
        """M = P_phi(S) for the privileged branch; M' = P_phi(S ⊙ ¬B) (zero) or with B's tokens dropped (drop)."""
        if self.sampler is None:
            raise ValueError("this model has no memory sampler")
        if branch == "privileged":
            return self.sampler(prior.tokens, prior.grid)
        if branch != "counterfactual":
            raise ValueError(f"unknown branch {branch!r}; expected one of {BRANCHES}")
        if intervention == "zero":
            return self.sampler(prior.tokens * (~prior.region_mask).unsqueeze(-1).to(prior.tokens.dtype), prior.grid)
        if intervention == "drop":
            return self.sampler(prior.tokens, prior.grid, drop=prior.region_mask)
        raise ValueError(f"unknown intervention {intervention!r}; expected one of {INTERVENTIONS}")

    # --- VLM passes ---------------------------------------------------------------------------------------------
    def forward(self, batch: PromptBatch, memory: torch.Tensor | None, features=None, **kwargs):
        kwargs.setdefault("labels", batch.labels)
        return forward_with_memory(self.vlm, batch, memory, self.latent_id, features=features, **kwargs)

    def generate(self, batch: PromptBatch, memory: torch.Tensor | None, max_new_tokens: int = 16, **kwargs):
        return generate_with_memory(self.vlm, batch, memory, self.latent_id, max_new_tokens=max_new_tokens,
                                    suppress_tokens=self.prompts.suppressed_ids, **kwargs)

    @torch.no_grad()
    def answer(self, images: list[Image.Image], questions: list[str], max_new_tokens: int = 16,
               branch: str = "privileged") -> list[str]:
        """Greedy answers, one image per question."""
        items = [self.prompts.encode([img], q) for img, q in zip(images, questions)]
        device = next(core_vlm(self.vlm).parameters()).device
        batch = self.prompts.collate(items, with_answers=False).to(device)
        memory = self.memory(self.prior(images), branch) if self.sampler is not None else None
        tokens = self.generate(batch, memory, max_new_tokens=max_new_tokens)
        return [t.strip() for t in self.processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)]
