"""MedSynapseV: the VLM, the prior encoder and the memory sampler composed; memory per branch; save / load.

A saved folder holds `medsynapse.json` (what to load and how) and the trained memory weights in safetensors. The VLM
and the encoder are not copied into every stage folder (an 8B VLM): the manifest names each by folder name and content
hash, and loading finds them through a search path (model/bases.py), so a folder copied elsewhere still loads. No file
a save writes holds an absolute path, and every file gets the mode the umask gives a new file (0644 under umask 022).
An exported folder (`medsynapse export`: manifest format 3, model/bundled.py) holds the merged VLM and A_psi itself.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from PIL import Image
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from medsynapse.locking import make_readable, write_bytes_atomic, write_text_atomic
from medsynapse.model.bases import BaseFolders, base_ref, resolve_base
from medsynapse.model.bundled import is_bundled, load_bundled_vlm, memory_state
from medsynapse.model.card import write_card
from medsynapse.model.counterfactual import counterfactual_tokens
from medsynapse.model.encoders import PriorEncoder, PriorOutput, load_encoder
from medsynapse.model.memory import (
    AutonomousConfig,
    AutonomousMemoryModule,
    DiagnosticMemorySampler,
    SamplerConfig,
    embedding_rms,
    sampler_attention,
)
from medsynapse.model.processor import ModelNotFoundError
from medsynapse.model.vlm import (
    EncodedPrompt,
    PromptBatch,
    PromptBuilder,
    core_vlm,
    forward_with_memory,
    generate_with_memory,
    load_vlm,
    vision_features,
)

if TYPE_CHECKING:
    from transformers import Qwen3VLTextConfig, Qwen3VLVisionConfig

BRANCHES = ("privileged", "counterfactual", "autonomous")
MANIFEST = "medsynapse.json"
MANIFEST_FORMAT = 2  # 2: the VLM and encoder by name + content hash (model/bases.py); 1: by absolute path
READABLE_FORMATS = (1, 2, 3)  # 3: an exported folder, the VLM (LoRA merged) and A_psi inside it (model/bundled.py)
ADAPTER_DIR = "adapter"
REFERENCE_BANK = "reference_bank.safetensors"


def lora_target_regex(projections: list[str]) -> str:
    """Restrict LoRA to the language model's layers (vision blocks use other names, but be explicit)."""
    return rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(projections)})"


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def load_weights(module: nn.Module, path: Path) -> None:
    """A module's safetensors file; a missing, truncated or mismatched file is one error naming it."""
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: missing (the model folder is incomplete)")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises several types for damaged files
        detail = " ".join(str(err).split())[:300]
        raise ValueError(f"{path}: damaged or written with other settings (e.g. n_memory): {detail}") from None
    load_state(module, state, path)


def load_state(module: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """`state` into `module`; a mismatch (other settings, a missing tensor) is one error naming `where`."""
    try:
        module.load_state_dict(state)
    except Exception as err:  # torch raises several types for mismatched tensors
        detail = " ".join(str(err).split())[:300]
        raise ValueError(f"{where}: damaged or written with other settings (e.g. n_memory): {detail}") from None


def load_reference_bank(path: Path) -> torch.Tensor:
    """The `reference` counterfactual's bank (K, M, d) from a model folder; missing or damaged: one error naming it."""
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: missing (the model folder is incomplete)")
    try:
        return load_file(str(path))["tokens"]
    except Exception as err:  # safetensors raises several types for damaged files; a foreign file lacks "tokens"
        detail = " ".join(str(err).split())[:300]
        raise ValueError(f"{path}: damaged or not a reference bank: {detail}") from None


def portable_adapter(folder: Path, base_name: str) -> None:
    """peft records its base as the path the VLM was loaded from (adapter_config.json's `base_model_name_or_path`,
    and its README.md): replace it by the base's name, so no saved file names an absolute path (loading passes the
    VLM to peft itself and never reads it), and give every file the umask's mode (safetensors writes 0600)."""
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    recorded = config.get("base_model_name_or_path")
    if recorded and recorded != base_name:
        config["base_model_name_or_path"] = base_name
        write_text_atomic(config_path, json.dumps(config, indent=2, sort_keys=True))
        card = folder / "README.md"
        if card.is_file():  # its metadata: `base_model: PATH` and the tag `base_model:adapter:PATH`
            named = re.sub(rf"^(\s*-?\s*base_model(?::adapter)?:\s*){re.escape(str(recorded))}\s*$",
                           lambda m: m.group(1) + base_name, card.read_text(), flags=re.MULTILINE)
            write_text_atomic(card, named)
    for path in folder.iterdir():
        if path.is_file():
            make_readable(path)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written atomically (fsynced, renamed into place) with the umask's mode."""
    write_bytes_atomic(path, safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def check_local_adapter(folder: Path) -> None:
    """The LoRA folder a manifest names must hold its files here. peft treats a path it cannot find as a hub repo id
    and downloads from it (an `ns/name`-shaped relative path could even fetch someone else's weights); MedSynapse
    never loads from the hub at run time, so a missing file is a local error naming it."""
    for name in ADAPTER_FILES:
        if not (folder / name).is_file():
            raise ModelNotFoundError(f"{folder / name}: the LoRA adapter file named by the model manifest ({MANIFEST}) "
                                     "is missing (the model folder is incomplete; nothing is fetched from the hub)")


def batch_image_counts(batch: PromptBatch, n_images: int) -> list[int]:
    """Images per question of a prompt batch, checked against the `n_images` images given for its memory."""
    given = batch.images_per_sample
    counts = [int(c) for c in given] if given is not None and len(given) else [1] * batch.input_ids.shape[0]
    if sum(counts) != n_images:
        raise ValueError(f"the batch's {len(counts)} questions show {sum(counts)} images, but {n_images} were given "
                         "for their memory (give every image of every question, in order)")
    return counts


class MedSynapseV(nn.Module):
    """VLM + optional prior encoder E_ana + optional sampler P_phi. Without a sampler it is the plain base VLM."""

    def __init__(self, vlm, processor, encoder: PriorEncoder | None = None,
                 sampler: DiagnosticMemorySampler | None = None, vlm_path: str | None = None,
                 encoder_path: str | None = None, autonomous: AutonomousMemoryModule | None = None,
                 adapter_path: str | None = None, latent: dict | None = None,
                 latent_module: nn.Module | None = None):
        super().__init__()
        self.vlm = vlm
        self.processor = processor
        self.encoder = encoder
        self.sampler = sampler
        self.autonomous = autonomous
        self.vlm_path, self.encoder_path, self.adapter_path = vlm_path, encoder_path, adapter_path
        memory_module = sampler if sampler is not None else autonomous
        self.n_memory = memory_module.config.n_memory if memory_module is not None else 0
        # a latent-reasoning baseline (model/latent.py): {"method": "coconut", "thoughts": k}; its k slots hold the
        # thoughts it computes itself, where MedSynapse-V's memory would go
        self.latent = latent
        self.latent_module = latent_module  # MCOUT-Multi's latent attention (model/latent.py), else None
        if latent is not None:
            if memory_module is not None:
                raise ValueError("a latent-reasoning model has no memory module")
            self.n_memory = int(latent["thoughts"])
        self.prompts = PromptBuilder(processor, self.n_memory)
        self.latent_id = self.prompts.latent_id
        if encoder is not None:
            encoder.eval().requires_grad_(False)
        # (K, M, d) prior tokens of images without a finding, for the `reference` counterfactual; set by Stages I-II
        self.reference_bank: torch.Tensor | None = None
        # how the model was trained to reply (answers.py): eval and predict prompt and score it this way
        self.answer_format = "direct"

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, vlm_path: str, encoder_path: str | None = None, n_memory: int = 16, width: int = 256,
              layers: int = 2, heads: int = 4, seed: int = 0, dtype: str = "auto",
              max_images: int = 1) -> MedSynapseV:
        """A fresh model for Stage I: loaded VLM and encoder, newly initialised sampler."""
        vlm, processor = load_vlm(vlm_path, dtype=dtype)
        encoder = load_encoder(encoder_path) if encoder_path else None
        sampler = None
        if encoder is not None and n_memory > 0:
            torch.manual_seed(seed)
            sampler = DiagnosticMemorySampler(SamplerConfig(
                prior_dim=encoder.feature_dim,
                hidden_size=cast("Qwen3VLTextConfig", vlm.config.text_config).hidden_size,
                n_memory=n_memory, width=width, layers=layers, heads=heads,
                embed_rms=embedding_rms(cast(nn.Embedding, vlm.get_input_embeddings())), max_images=max_images))
        return cls(vlm, processor, encoder, sampler, str(vlm_path), encoder_path)

    @classmethod
    def plain_with_lora(cls, vlm_path: str, r: int, alpha: int, dropout: float, projections: list[str],
                        dtype: str = "auto") -> MedSynapseV:
        """The plain VLM (no memory), every base weight frozen, with a fresh LoRA on the language model: where the
        no-memory baselines (SFT, CoT-SFT, Coconut, MCOUT, IVT-LR) start. Seed torch first: the LoRA init draws."""
        vlm, processor = load_vlm(vlm_path, dtype=dtype)
        model = cls(vlm, processor, vlm_path=vlm_path)
        model.vlm.requires_grad_(False)
        model.add_lora(r, alpha, dropout, projections)
        return model

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.vlm, "peft_config")

    def add_lora(self, r: int, alpha: int, dropout: float, projections: list[str]) -> None:
        """Wrap the VLM with a fresh peft LoRA on the language model (Stage II); only the adapter trains."""
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                            target_modules=lora_target_regex(projections))
        self.vlm = get_peft_model(self.vlm, config)

    def save_pretrained(self, folder: str | Path, adapter_state: dict[str, torch.Tensor] | None = None,
                        training: dict | None = None) -> None:
        """The loadable folder, with its model card (README.md, model/card.py; `training`: the recipe's record).
        `adapter_state`: the LoRA tensors to write (keys as in the VLM's state dict) when the VLM's own are not whole
        on this process (sharded training gathers them first)."""
        from medsynapse.locking import writes_into

        with writes_into(folder, "the model"):  # a full disk or read-only folder: one line naming it
            self._save(Path(folder), adapter_state, training)

    def _save(self, folder: Path, adapter_state: dict[str, torch.Tensor] | None, training: dict | None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        # before anything is written: a vanished base is refused here (vlm_path: set by every constructor that saves)
        vlm = base_ref(cast(str, self.vlm_path), folder, "vlm")
        encoder = base_ref(self.encoder_path, folder, "encoder") if self.encoder_path else None
        manifest = {"format": MANIFEST_FORMAT, "vlm": vlm.to_dict(),
                    "encoder": encoder.to_dict() if encoder is not None else None,
                    "sampler": self.sampler.config.to_dict() if self.sampler is not None else None,
                    "adapter": ADAPTER_DIR if self.has_adapter or self.adapter_path else None,
                    "autonomous": self.autonomous.config.to_dict() if self.autonomous is not None else None,
                    "reference_bank": REFERENCE_BANK if self.reference_bank is not None and self.sampler is not None
                    else None,
                    "answer_format": self.answer_format, "latent": self.latent}
        if self.has_adapter:
            # adapter_config.json + adapter_model.safetensors
            self.vlm.save_pretrained(folder / ADAPTER_DIR, **({"state_dict": adapter_state} if adapter_state else {}))
            portable_adapter(folder / ADAPTER_DIR, vlm.name)
        elif self.adapter_path and Path(self.adapter_path).resolve() != (folder / ADAPTER_DIR).resolve():
            shutil.copytree(self.adapter_path, folder / ADAPTER_DIR, dirs_exist_ok=True)  # merged in memory
            portable_adapter(folder / ADAPTER_DIR, vlm.name)
        for name, module in (("autonomous", self.autonomous), ("latent_attention", self.latent_module)):
            if module is not None:
                write_tensors(folder / f"{name}.safetensors", module.state_dict())
        if self.sampler is not None:
            write_tensors(folder / "sampler.safetensors", self.sampler.state_dict())
        if manifest["reference_bank"]:
            assert self.reference_bank is not None  # the manifest names the bank only when there is one
            write_tensors(folder / REFERENCE_BANK, {"tokens": self.reference_bank})
        write_card(folder, manifest, training)
        write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2))

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: str = "auto", merge_adapter: bool = False,
                        bases: BaseFolders | None = None) -> MedSynapseV:
        """A MedSynapse folder, or a plain local Qwen3-VL folder (loaded as the base model, no memory).

        Only what the manifest names is built: a Stage III student folder loads VLM + LoRA + A_psi, and neither the
        prior encoder nor P_phi. `merge_adapter` folds the LoRA into the weights (inference: no adapter overhead).
        The base VLM and encoder are found as model/bases.py describes; `bases` gives their folders explicitly (the
        CLI's --vlm / --encoder), checked against the recorded content hash.
        """
        folder = Path(folder)
        vlm: Any  # the Qwen3-VL model, or the PeftModel around it (peft forwards LoraModel's methods at run time)
        if not (folder / MANIFEST).is_file():
            vlm, processor = load_vlm(folder, dtype=dtype)
            return cls(vlm, processor, vlm_path=str(folder))
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except json.JSONDecodeError as err:
            raise ModelNotFoundError(f"{folder / MANIFEST}: not valid JSON ({err}); the model folder is "
                                     "damaged") from None
        if manifest.get("format") not in READABLE_FORMATS:
            raise ValueError(f"{folder / MANIFEST}: format {manifest.get('format')!r} is not one this version reads "
                             f"({', '.join(map(str, READABLE_FORMATS))}); the folder was written by another MedSynapse "
                             "version or edited")
        bases = bases or BaseFolders()
        if is_bundled(manifest):
            return cls._from_bundled(folder, manifest, dtype, bases)
        vlm_path = resolve_base(manifest["vlm"], folder, "vlm", bases.vlm)
        encoder_path = resolve_base(manifest.get("encoder"), folder, "encoder", bases.encoder)
        vlm, processor = load_vlm(cast(str, vlm_path), dtype=dtype)  # a manifest always names its VLM
        encoder = load_encoder(encoder_path) if encoder_path else None
        sampler = None
        if manifest.get("sampler"):
            sampler = DiagnosticMemorySampler(SamplerConfig(**manifest["sampler"]))
            load_weights(sampler, folder / "sampler.safetensors")
        autonomous = None
        if manifest.get("autonomous"):
            autonomous = AutonomousMemoryModule(AutonomousConfig(**manifest["autonomous"]))
            load_weights(autonomous, folder / "autonomous.safetensors")
        adapter_path = None
        if manifest.get("adapter"):
            from peft import PeftModel

            adapter_path = str(folder / manifest["adapter"])
            check_local_adapter(Path(adapter_path))
            vlm = PeftModel.from_pretrained(vlm, adapter_path, is_trainable=False)
            for config in vlm.peft_config.values():  # the file names the base by name (portable_adapter); in memory
                config.base_model_name_or_path = vlm_path  # the local folder, as peft checks it when saving again
            if merge_adapter:
                vlm = vlm.merge_and_unload()
        latent, latent_module = manifest.get("latent"), None
        if latent is not None and latent.get("attention"):
            from medsynapse.model.latent import LatentAttentionConfig, MultimodalLatentAttention

            latent_module = MultimodalLatentAttention(LatentAttentionConfig(**latent["attention"]))
            load_weights(latent_module, folder / "latent_attention.safetensors")
        model = cls(vlm, processor, encoder, sampler, vlm_path, encoder_path, autonomous,
                    adapter_path if merge_adapter else None, latent=latent, latent_module=latent_module)
        if manifest.get("reference_bank"):
            model.reference_bank = load_reference_bank(folder / manifest["reference_bank"])
        model.answer_format = manifest.get("answer_format", "direct")  # folders written before it was recorded
        return model.eval()

    @classmethod
    def _from_bundled(cls, folder: Path, manifest: dict, dtype: str, bases: BaseFolders) -> MedSynapseV:
        """An exported folder (model/bundled.py): the merged VLM and A_psi from the folder itself; no base is
        searched for, so none may be given."""
        if bases.vlm or bases.encoder:
            raise ValueError(f"{folder}: an exported folder holds its own VLM and needs no encoder; --vlm / --encoder "
                             "do not apply")
        if not manifest.get("autonomous"):
            raise ValueError(f"{folder / MANIFEST}: an exported folder without A_psi ('autonomous'); the folder is "
                             "damaged or edited")
        vlm, processor = load_bundled_vlm(folder, dtype)
        autonomous = AutonomousMemoryModule(AutonomousConfig(**manifest["autonomous"]))
        load_state(autonomous, memory_state(folder), folder)
        model = cls(vlm, processor, vlm_path=str(folder), autonomous=autonomous)
        model.answer_format = manifest.get("answer_format", "direct")
        return model.eval()

    # --- memory -------------------------------------------------------------------------------------------------
    @property
    def max_images(self) -> int | None:
        """The most images a question may have for this model's memory (its image-index embedding's size), None
        when any number goes (no memory module, or one that does not tell images apart)."""
        module = self.sampler if self.sampler is not None else self.autonomous
        limit = getattr(getattr(module, "config", None), "max_images", 1)
        return limit if limit > 1 else None

    def prior(self, images: list[Image.Image]) -> PriorOutput:
        """E_ana on each image given (every image of every question, in order), without gradients (frozen)."""
        if self.encoder is None:
            raise ValueError("this model has no prior encoder")
        with torch.no_grad():
            return self.encoder.encode(images)

    def prior_summary(self, images: list[Image.Image]) -> list[dict]:
        """What each image of one question gives the memory: its prior grid, token count, region size, whether the
        encoder found anything, and the tokens' RMS (numbers a person can read; the tokens themselves are large)."""
        prior = self.prior(images)
        return [{"grid": list(prior.grid), "tokens": int(prior.tokens.shape[1]),
                 "region_tokens": int(prior.region_mask[i].sum()),
                 "finding": None if prior.finding is None else bool(prior.finding[i]),
                 "token_rms": round(float(prior.tokens[i].float().pow(2).mean().sqrt()), 6)}
                for i in range(len(images))]

    def autonomous_memory(self, batch: PromptBatch, features) -> torch.Tensor:
        """M_auto = A_psi(the VLM's merged visual tokens): the encoder-free memory."""
        if self.autonomous is None:
            raise ValueError("this model has no autonomous memory module (A_psi)")
        merge = cast("Qwen3VLVisionConfig", core_vlm(self.vlm).config.vision_config).spatial_merge_size
        grids = [(int(h) // merge, int(w) // merge) for _, h, w in batch.image_grid_thw.tolist()]
        counts = batch.images_per_sample or [1] * batch.input_ids.shape[0]
        return self.autonomous(features.pooler_output, grids, counts)

    @torch.no_grad()
    def memory_maps(self, image: Image.Image) -> dict[str, torch.Tensor] | None:
        """Where the memory of one image comes from, as maps over the image (the app draws them; nothing here draws).

        A model with the prior encoder and P_phi: `region` (Hf, Wf), the encoder's diagnostic region B (what the
        counterfactual removes), and `probes` (layers, N, Hf, Wf), each probe's cross-attention over the prior tokens
        per sampler layer (averaged over heads; each map sums to 1). A student whose A_psi pools by attention:
        `probes` (1, N, h, w) over the VLM's merged visual tokens. None for a model without such maps (a plain VLM, a
        latent-reasoning model, A_psi's grid pooling)."""
        if self.sampler is not None and self.encoder is not None:
            prior = self.prior([image])
            probes = sampler_attention(self.sampler, prior.tokens, prior.grid)[0]
            return {"region": prior.region_mask[0].reshape(prior.grid).float(), "probes": probes}
        if self.autonomous is None or self.autonomous.config.pooling != "attention":
            return None
        device = next(core_vlm(self.vlm).parameters()).device
        batch = self.prompts.collate([self.prompts.encode([image], "")], with_answers=False).to(device)
        features = vision_features(self.vlm, batch)
        merge = cast("Qwen3VLVisionConfig", core_vlm(self.vlm).config.vision_config).spatial_merge_size
        _, h, w = batch.image_grid_thw[0].tolist()
        weights = self.autonomous.attend(features.pooler_output, [(h // merge, w // merge)], [1])[1]
        return {"probes": weights[0].reshape(1, -1, h // merge, w // merge)}

    @torch.no_grad()
    def counterfactual_check(self, image: Image.Image, question: str, max_new_tokens: int = 16,
                             intervention: str | None = None) -> dict:
        """How much one answer rests on the encoder's region: the greedy answer with the memory M and with M' (the
        region removed by `intervention`; default `reference` when the folder has its bank, else the paper's
        `zero`), and log p(answer | M) − log p(answer | M'), the answer's own tokens scored under both memories
        (Eq. 5's log-ratio for this one answer). Needs the prior encoder and P_phi."""
        from medsynapse.model.vlm import completion_logprobs, completion_mask

        if self.sampler is None or self.encoder is None:
            raise ValueError("the counterfactual needs the prior encoder and the memory sampler P_phi (a teacher)")
        intervention = intervention or ("reference" if self.reference_bank is not None else "zero")
        device = next(core_vlm(self.vlm).parameters()).device
        batch = self.prompts.collate([self.prompts.encode([image], question)], with_answers=False).to(device)
        features = vision_features(self.vlm, batch)
        prior = self.prior([image])
        memories = {"with": self.memory(prior), "without": self.memory(prior, "counterfactual", intervention)}
        tokens = {k: self.generate(batch, m, max_new_tokens=max_new_tokens, features=features)
                  for k, m in memories.items()}
        mask = completion_mask(tokens["with"], self.prompts.eos_id)
        logp = {k: float(completion_logprobs(self.vlm, batch, m, tokens["with"], mask, self.latent_id,
                                             features).sum()) for k, m in memories.items()}
        decode = self.processor.tokenizer.batch_decode
        return {"answer": decode(tokens["with"], skip_special_tokens=True)[0].strip(),
                "answer_without_region": decode(tokens["without"], skip_special_tokens=True)[0].strip(),
                "logprob": logp["with"], "logprob_without_region": logp["without"],
                "logprob_shift": logp["with"] - logp["without"], "intervention": intervention}

    def memory(self, prior: PriorOutput, branch: str = "privileged", intervention: str = "zero",
               images_per_sample: list[int] | None = None) -> torch.Tensor:
        """M = P_phi(S) for the privileged branch; M' = P_phi(S with the region B removed) for the counterfactual
        (`intervention`: zero = S ⊙ ¬B as in the paper, drop, inpaint or reference; see model/counterfactual.py).

        `prior` holds one row per image; `images_per_sample` (None: one image per question) groups them into
        questions: the probes read every image of a question, and the counterfactual removes each image's own region
        (an image without a finding keeps its tokens under `reference`)."""
        if self.sampler is None:
            raise ValueError("this model has no memory sampler")
        if branch == "privileged":
            return self.sampler(prior.tokens, prior.grid, images_per_sample=images_per_sample)
        if branch != "counterfactual":
            raise ValueError(f"unknown branch {branch!r}; expected one of {BRANCHES}")
        tokens, drop = counterfactual_tokens(prior.tokens, prior.grid, prior.region_mask, intervention,
                                             finding=prior.finding, bank=self.reference_bank)
        return self.sampler(tokens, prior.grid, drop=drop, images_per_sample=images_per_sample)

    # --- VLM passes ---------------------------------------------------------------------------------------------
    def forward(self, batch: PromptBatch, memory: torch.Tensor | None, features=None, **kwargs):
        kwargs.setdefault("labels", batch.labels)
        return forward_with_memory(self.vlm, batch, memory, self.latent_id, features=features, **kwargs)

    def generate(self, batch: PromptBatch, memory: torch.Tensor | None, max_new_tokens: int = 16, **kwargs):
        return generate_with_memory(self.vlm, batch, memory, self.latent_id, max_new_tokens=max_new_tokens,
                                    suppress_tokens=self.prompts.suppressed_ids, **kwargs)

    def memory_for(self, batch: PromptBatch, images: list[Image.Image], features, branch: str | None = None,
                   intervention: str = "zero"):
        """Memory for a prompt batch: autonomous (A_psi) when present, else P_phi's branch; None for the base VLM.
        `images`: every image of every question of the batch, in order (the prior encoder sees them all).

        An explicit "privileged" or "counterfactual" branch on a model without the prior encoder and P_phi (an
        encoder-free student, a plain VLM) is an error, not a silent run without memory."""
        if branch in ("privileged", "counterfactual") and (self.sampler is None or self.encoder is None):
            kind = "an encoder-free student (A_psi only)" if self.autonomous is not None else "a plain VLM"
            raise ValueError(f"the {branch} branch needs the prior encoder and the memory sampler P_phi, and this "
                             f"model is {kind}; use branch=None (the model's own memory)")
        if self.latent is not None:
            if branch is not None:
                raise ValueError(f"a latent-reasoning model ({self.latent['method']}) has no {branch} branch")
            return LATENT_MEMORY.get(self.latent["method"], LATENT_MEMORY["coconut"])(self, batch, features)
        branch = branch or ("autonomous" if self.autonomous is not None else "privileged")
        if branch == "autonomous":
            return self.autonomous_memory(batch, features)
        if self.sampler is None:
            return None
        counts = batch_image_counts(batch, len(images))
        if branch == "counterfactual" and intervention == "pixels":
            return self.image_counterfactual_memory(images, counts)
        return self.memory(self.prior(images), branch, intervention, counts)

    def image_counterfactual_memory(self, images: list[Image.Image],
                                    images_per_sample: list[int] | None = None) -> torch.Tensor:
        """M' with the finding removed from the images themselves and the encoder run again ("pixels")."""
        # (memory_for calls this only when both the encoder and P_phi are present)
        with torch.no_grad():
            edited = cast(PriorEncoder, self.encoder).encode_counterfactual(images)
        return cast(DiagnosticMemorySampler, self.sampler)(edited.tokens, edited.grid,
                                                           images_per_sample=images_per_sample)

    @torch.no_grad()
    def answer(self, images: list[Image.Image], questions: list[str], max_new_tokens: int = 16,
               branch: str | None = None, **generate_kwargs) -> list[str]:
        """Greedy answers, one image per question."""
        items = [self.prompts.encode([img], q) for img, q in zip(images, questions)]
        return self.answer_encoded(items, images, max_new_tokens, branch, **generate_kwargs)

    @torch.no_grad()
    def answer_encoded(self, items: list[EncodedPrompt], images: list[Image.Image], max_new_tokens: int = 16,
                       branch: str | None = None, intervention: str = "zero",
                       memory_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       **generate_kwargs) -> list[str]:
        """Greedy answers to already-encoded prompts (the one generation path of `answer`, evaluation and the
        benchmark runner). `images`: every image of every item, in order. Vision features are computed once and
        reused for A_psi and generation; the prior encoder sees every image.
        `memory_transform` maps the memory (B, N, H) to what the VLM receives
        instead (the diagnostics' zeroed / mean / shuffled / noise memories); None leaves the path unchanged."""
        tokens = self.generate_encoded(items, images, max_new_tokens, branch, intervention, memory_transform,
                                       **generate_kwargs)
        return [t.strip() for t in self.processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)]

    @torch.no_grad()
    def generate_encoded(self, items: list[EncodedPrompt], images: list[Image.Image], max_new_tokens: int = 16,
                         branch: str | None = None, intervention: str = "zero",
                         memory_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         **generate_kwargs) -> torch.Tensor:
        """`answer_encoded`'s new tokens (B, T), before decoding (a server counts them and sees where each ended)."""
        device = next(core_vlm(self.vlm).parameters()).device
        batch = self.prompts.collate(items, with_answers=False).to(device)
        features = vision_features(self.vlm, batch)
        memory = self.memory_for(batch, images, features, branch, intervention)
        if memory_transform is not None:
            if memory is None:
                raise ValueError("memory_transform given, but this model has no memory (a plain VLM)")
            memory = memory_transform(memory)
        return self.generate(batch, memory, max_new_tokens=max_new_tokens, features=features, **generate_kwargs)


def _latent():
    from medsynapse.model import latent  # imported when a latent-reasoning model answers (it is rarely needed)

    return latent


# A latent-reasoning baseline's thoughts (model/latent.py), by the method its folder records; the model's one table
# of method names (a folder naming no known method is read as Coconut's, as before).
LATENT_MEMORY: dict[str, Callable[[MedSynapseV, PromptBatch, object], torch.Tensor]] = {
    "coconut": lambda m, batch, features: _latent().latent_thoughts(m.vlm, batch, m.n_memory, m.latent_id, features),
    "mcout": lambda m, batch, features: _latent().mcout_thoughts(m.vlm, m.latent_module, batch, m.n_memory,
                                                                 m.latent_id, features),
    "ivt-lr": lambda m, batch, features: _latent().ivt_latents(
        m.vlm, batch, cast(dict, m.latent)["steps"], cast(dict, m.latent)["patches"], cast(dict, m.latent)["layer"],
        m.latent_id, features)[0],
}
