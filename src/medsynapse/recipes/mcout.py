"""MCOUT-Multi† (Pham et al. 2025, arXiv 2508.12587) on Qwen3-VL: multimodal continuous thoughts with auxiliary losses.

The paper's baseline row "adapted with identical backbone and training data". Mechanism (model/latent.py): k thought
slots between the prompt and the answer; each thought is the last hidden state passed through the multimodal latent
attention module over the prompt's visual + text embeddings (MultimodalLatentAttention). Loss, as the reference code
adds it up (sums, not averaged): the answer's cross-entropy with all k thoughts, plus mu times the sum over t = 1..k of
the answer's cross-entropy right after thought t (the answer placed after the first t thoughts). No curriculum and no
rationales: the text learnt is the answer, in the `direct` format.

The reference code's defect, not reproduced (../shared/reference/latent-peers.md): at training time it concatenates
the thoughts AFTER the answer and the padding, so under causal attention the answer loss cannot depend on them and the
module gets no useful gradient, while at inference the thoughts come after the prompt. Here they sit between prompt
and answer at training and at inference alike (tested: the answer loss has a non-zero gradient into the module).

Adaptations: the model section's LoRA (reference: r 64, alpha 16 on a Llama-3.2-1B), the module's width
`attention_dim` (reference 2048, its 8 heads), k = `thoughts` (reference: 10 in training, 5 in its eval config; one k
here for both), the reference's discount gamma^t left at its default 1. One process for now, as Coconut.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from medsynapse.config import to_dict
from medsynapse.data.dataset import training_dataset
from medsynapse.model.latent import LatentAttentionConfig, MultimodalLatentAttention, mcout_thoughts
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.vlm import PromptBuilder, core_vlm, vision_features, with_slots
from medsynapse.recipes import trainer
from medsynapse.recipes.config_base import LoRAConfig, LossReduction, TrainingConfig

if TYPE_CHECKING:
    from transformers import Qwen3VLTextConfig


@dataclass
class MCOUTConfig(TrainingConfig, LoRAConfig):
    model: str = ""  # the base VLM folder
    output_dir: str = "runs/mcout"
    thoughts: int = 5  # k
    mu: float = 0.3  # weight of the auxiliary losses
    attention_dim: int = 2048
    attention_heads: int = 8
    lr: float = 1e-5  # reference
    warmup_ratio: float = 0.0
    max_steps: int = 0
    epochs: float = 1.0
    loss_reduction: LossReduction = "token"


def mcout_loss(model: MedSynapseV, module: MultimodalLatentAttention, prompts: PromptBuilder, items: list, k: int,
               mu: float, features, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, final) loss of one batch: CE(answer | all k thoughts) + mu * sum_t CE(answer | thoughts 1..t).
    `items` are the batch's samples encoded with k slots and their answers; the t-slot prompts are derived from them
    (`with_slots`). Thoughts 1..t do not depend on later slots, so they are computed once, with k slots."""
    device = next(core_vlm(model.vlm).parameters()).device
    prompt = prompts.collate(items, with_answers=False).to(device)
    thoughts = mcout_thoughts(model.vlm, module, prompt, k, model.latent_id, features)
    final = trainer.answer_loss(model.vlm, prompts.collate(items, with_answers=True).to(device), thoughts,
                                model.latent_id, features, reduction)
    total = final
    for t in range(1, k):
        batch = prompts.collate([with_slots(item, t, model.latent_id) for item in items], with_answers=True)
        total = total + mu * trainer.answer_loss(model.vlm, batch.to(device), thoughts[:, :t], model.latent_id,
                                                 features, reduction)
    return total + mu * final, final  # the auxiliary loss after thought k is the final one


@trainer.one_run_per_folder
def train_mcout(config: MCOUTConfig, on_step: Callable[[int], None] | None = None) -> Path:
    trainer.check_paths(config, ("model", "train_file"))
    trainer.check_positive(config, ("lora_r", "lora_alpha", "lr", "batch_size", "thoughts", "attention_dim",
                                    "attention_heads", "save_every", "log_every"))
    if not config.mu >= 0:
        raise ValueError(f"mu must be >= 0, got {config.mu}")
    trainer.check_steps(config.max_steps, minimum=0 if config.epochs > 0 else 1)
    output = Path(config.output_dir)
    accelerator = trainer.make_accelerator(output, config.report_to)
    trainer.require_one_process(accelerator, "MCOUT")
    torch.manual_seed(config.seed)
    model = MedSynapseV.plain_with_lora(config.model, config.lora_r, config.lora_alpha, config.lora_dropout,
                                        config.lora_targets, dtype=config.dtype)
    hidden = cast("Qwen3VLTextConfig", core_vlm(model.vlm).config.text_config).hidden_size
    module = MultimodalLatentAttention(LatentAttentionConfig(hidden, config.attention_dim, config.attention_heads))
    trained = nn.ModuleDict({"vlm": model.vlm, "latent_attention": module}).to(accelerator.device)

    prompts = PromptBuilder(model.processor, config.thoughts)
    dataset = training_dataset(config.train_file, prompts, config.families, config.answer_types, with_answers=True)
    total_steps = config.max_steps or max(1, round(config.epochs * len(dataset) / config.batch_size))
    optimizer = trainer.adamw(trained, config.lr, config.weight_decay)
    scheduler = trainer.cosine_schedule(optimizer, total_steps, config.warmup_ratio)

    start = 0
    checkpoint = trainer.resume_point(output, config, total_steps)
    if checkpoint is not None:
        start = trainer.load_checkpoint(checkpoint, trained, optimizer, scheduler)["step"]
    accelerator.init_trackers("mcout", config={k: str(v) for k, v in to_dict(config).items()})
    trained.train()
    bar = tqdm(range(start, total_steps), desc="mcout", disable=not accelerator.is_main_process, initial=start,
               total=total_steps)
    for step in bar:
        indices = trainer.global_batch_indices(len(dataset), config.batch_size, step, config.seed)
        items = [dataset.encoded(i) for i in indices]
        with torch.no_grad():
            features = vision_features(model.vlm, prompts.collate(items).to(accelerator.device))
        loss, final = mcout_loss(model, module, prompts, items, config.thoughts, config.mu, features,
                                 config.loss_reduction)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(trained.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % config.log_every == 0 or step == total_steps - 1:
            logs = {"loss": loss.item(), "answer_loss": final.item(), "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm)}
            accelerator.log(logs, step=step)
            bar.set_postfix(loss=f"{logs['loss']:.3f}")
        done = step + 1
        if done % config.save_every == 0 or done == total_steps:
            trainer.save_checkpoint(output, done, trained, optimizer, scheduler, config=config)
        if on_step is not None:
            on_step(done)

    trained.eval()
    model.latent = {"method": "mcout", "thoughts": config.thoughts, "attention": module.config.to_dict()}
    model.latent_module = module
    model.save_pretrained(output, training=trainer.training_record(config, "mcout"))
    trainer.end_training(accelerator)
    return output
