"""Stage II, Causal Counterfactual Refinement: GRPO on an LLM LoRA with R = λ_acc·r_acc + λ_causal·r_causal.

Per step, top to bottom:
1. B prompts; their prior tokens (cached table), memory M and counterfactual memory M' (frozen sampler, no grad) and
   vision features are computed once per prompt and reused by every rollout and every pass below.
2. G rollouts per prompt in one batched, KV-cached `generate` over the B·G batch (eval mode: no dropout).
3. r_acc from the shared answer extraction; r_causal from ONE no-grad forward over 2·B·G rows (M rows, then M' rows).
   The M rows' log-probs are also the old log-probs of the clipped ratio (same policy, same mode): no extra pass.
4. Group-normalised advantages; `num_iterations` optimisation passes with the clipped surrogate (+ optional k3 KL to
   the adapter-disabled model).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from medsynapse.config import to_dict
from medsynapse.data.dataset import training_dataset
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.sampling import row_keys, sampling_kwargs
from medsynapse.model.vlm import completion_logprobs, completion_mask, select_features, vision_features
from medsynapse.objectives.grpo import clipped_policy_loss, group_advantages, zero_std_fraction
from medsynapse.objectives.rewards import accuracy_rewards, causal_rewards, total_reward
from medsynapse.recipes import trainer
from medsynapse.recipes.stage1_warmup import prior_table


@dataclass
class Stage2Config:
    model: str = ""  # a Stage I folder (sampler + VLM + encoder); a plain VLM folder with use_memory: false
    use_memory: bool = True  # false: plain GRPO on the VLM (no memory, λ_causal must be 0), e.g. to compare with TRL
    train_file: str = ""
    output_dir: str = "runs/stage2"
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    group_size: int = 4
    batch_size: int = 8  # prompts per step (global); each has group_size rollouts
    max_steps: int = 200
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    temperature: float = 0.7
    top_p: float = 0.95
    rollout_sampling: str = "keyed"  # keyed: per-rollout noise from (seed, step, position), the same on any world
    # size (model/sampling.py) | torch: transformers' sampler on the process RNG
    max_new_tokens: int = 16
    lambda_acc: float = 1.0
    lambda_causal: float = 0.5
    causal_reduction: str = "sum"  # sum (paper Eq. 5) | mean
    causal_clip: float | None = None
    causal_gate: str = "none"  # none (paper) | correct (r_causal credited to correct rollouts only)
    intervention: str = "zero"  # zero (paper) | drop
    loss_type: str = "grpo"  # grpo | dr_grpo | dapo
    epsilon: float = 0.2
    epsilon_high: float | None = None
    num_iterations: int = 1
    beta: float = 0.0  # KL to the adapter-disabled model
    advantage_eps: float = 1e-4
    families: list[str] = field(default_factory=list)
    answer_types: list[str] = field(default_factory=lambda: ["yes_no", "multiple_choice", "open"])
    record_last_fraction: float = 0.2  # r_causal of correct / wrong rollouts is summarised over this tail
    save_every: int = 50
    log_every: int = 1
    seed: int = 0
    resume: bool = False
    dtype: str = "float32"
    gradient_checkpointing: bool = False  # non-reentrant, on the VLM layers: less activation memory
    prior_cache: str = ""  # folder of `medsynapse cache-features` shards; read when present, filled when missing


@dataclass
class Rollouts:
    tokens: torch.Tensor  # (B*G, T)
    mask: torch.Tensor  # (B*G, T)
    texts: list[str]
    seconds: float


def generate_rollouts(model: MedSynapseV, batch, memory, features, config: Stage2Config,
                      keys: torch.Tensor) -> Rollouts:
    """All B·G rollouts in one cached, sampled `generate` call; `keys` (B·G,) seed each row's draws."""
    start = time.perf_counter()
    tokens = model.generate(batch, memory, max_new_tokens=config.max_new_tokens, features=features,
                            **sampling_kwargs(keys, config.rollout_sampling, config.temperature, config.top_p))
    mask = completion_mask(tokens, model.prompts.eos_id)
    texts = model.processor.tokenizer.batch_decode(tokens * mask + (1 - mask) * model.prompts.eos_id,
                                                   skip_special_tokens=True)
    return Rollouts(tokens, mask, texts, time.perf_counter() - start)


@torch.no_grad()
def factual_and_counterfactual_logprobs(policy, batch, memory, memory_cf, rollouts: Rollouts, features,
                                        latent_id: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(o_t | M) and log π(o_t | M') from one forward over the two conditions stacked."""
    n = rollouts.tokens.shape[0]
    both = batch.select(list(range(n)) * 2)
    both_features = None if features is None else select_features(features, batch.image_rows(list(range(n))) * 2)
    logp = completion_logprobs(policy, both, torch.cat([memory, memory_cf]), rollouts.tokens.repeat(2, 1),
                               rollouts.mask.repeat(2, 1), latent_id, features=both_features, temperature=temperature)
    return logp[:n], logp[n:]


def train_stage2(config: Stage2Config, on_step: Callable[[int], None] | None = None) -> Path:
    output = Path(config.output_dir)
    accelerator = trainer.make_accelerator(output)
    torch.manual_seed(config.seed)
    G = config.group_size

    model = MedSynapseV.from_pretrained(config.model, dtype=config.dtype)
    if not config.use_memory:
        if config.lambda_causal != 0.0:
            raise ValueError("use_memory: false has no counterfactual memory; set lambda_causal: 0")
        model = MedSynapseV(model.vlm, model.processor, vlm_path=model.vlm_path)  # plain VLM, no memory slots
    elif model.sampler is None or model.encoder is None:
        raise ValueError(f"{config.model}: Stage II needs a Stage I folder (sampler and encoder)")
    model.vlm.requires_grad_(False)
    if model.sampler is not None:
        model.sampler.requires_grad_(False).eval()
    model.add_lora(config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets)
    model.to(accelerator.device)
    if config.gradient_checkpointing:
        trainer.enable_activation_checkpointing(model.vlm)  # active in the train-mode update passes only

    dataset = training_dataset(config.train_file, model.prompts, config.families, config.answer_types,
                               with_answers=False)
    priors, prior_row = (prior_table(model.prior, model.encoder_path, dataset, cache_dir=config.prior_cache)
                         if config.use_memory else (None, None))

    total_updates = config.max_steps * config.num_iterations
    optimizer = trainer.adamw(model.vlm, config.lr, config.weight_decay)
    scheduler = trainer.cosine_schedule(optimizer, total_updates, config.warmup_ratio)
    policy, optimizer, scheduler = accelerator.prepare(model.vlm, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(policy)
    model.vlm = unwrapped

    start = 0
    record: dict[str, list[float]] = {"correct": [], "wrong": []}
    checkpoint = trainer.latest_checkpoint(output) if config.resume else None
    if checkpoint is not None:
        state = trainer.load_checkpoint(checkpoint, unwrapped, optimizer, scheduler)
        start, record = state["step"], state.get("causal_record", record)
    accelerator.init_trackers("stage2", config={k: str(v) for k, v in to_dict(config).items()})
    record_from = int(config.max_steps * (1 - config.record_last_fraction))

    bar = tqdm(range(start, config.max_steps), desc="stage2", disable=not accelerator.is_main_process,
               initial=start, total=config.max_steps)
    step_seconds: list[float] = []
    for step in bar:
        step_start = time.perf_counter()
        indices = trainer.rank_slice(trainer.global_batch_indices(len(dataset), config.batch_size, step, config.seed),
                                     accelerator.process_index, accelerator.num_processes)
        prompts = model.prompts.collate([dataset.encoded(i) for i in indices], with_answers=False)
        prompts = prompts.to(accelerator.device)
        rows = [r for r in range(len(indices)) for _ in range(G)]
        memory = memory_cf = None
        with torch.no_grad():
            if config.use_memory:
                prior = priors.select([prior_row[i] for i in indices])
                prior = type(prior)(prior.tokens.to(accelerator.device), prior.grid,
                                    prior.region_mask.to(accelerator.device))
                memory = model.memory(prior)[rows]
                memory_cf = model.memory(prior, "counterfactual", config.intervention)[rows]
            features = vision_features(unwrapped, prompts)  # the vision tower has no LoRA: reused by every pass
        batch = prompts.select(rows)
        batch_features = select_features(features, prompts.image_rows(rows))
        rollout_samples = [dataset.samples[indices[r]] for r in rows]

        unwrapped.eval()
        keys = row_keys(config.seed, step, trainer.global_positions(config.batch_size, accelerator.process_index,
                                                                    accelerator.num_processes), G)
        rollouts = generate_rollouts(model, batch, memory, batch_features, config, keys)
        r_acc = accuracy_rewards(rollouts.texts, rollout_samples).to(accelerator.device)
        if config.lambda_causal != 0.0:
            logp_f, logp_cf = factual_and_counterfactual_logprobs(unwrapped, batch, memory, memory_cf, rollouts,
                                                                  batch_features, model.latent_id, config.temperature)
            r_causal = causal_rewards(logp_f, logp_cf, rollouts.mask, config.causal_reduction, config.causal_clip)
        else:  # no counterfactual pass: only the old log-probs are needed
            with torch.no_grad():
                logp_f = completion_logprobs(unwrapped, batch, memory, rollouts.tokens, rollouts.mask,
                                             model.latent_id, batch_features, config.temperature)
            r_causal = torch.zeros_like(r_acc)
        rewards = total_reward(r_acc, r_causal, config.lambda_acc, config.lambda_causal, config.causal_gate)
        advantages = group_advantages(rewards, G, config.advantage_eps)
        ref_logp = None
        if config.beta != 0.0:
            with torch.no_grad(), unwrapped.disable_adapter():
                ref_logp = completion_logprobs(unwrapped, batch, memory, rollouts.tokens, rollouts.mask,
                                               model.latent_id, batch_features, config.temperature)
        if step >= record_from and config.lambda_causal != 0.0:
            for acc, causal in zip(r_acc.tolist(), r_causal.tolist()):
                record["correct" if acc > 0 else "wrong"].append(causal)

        unwrapped.train()
        for _ in range(config.num_iterations):
            logp = completion_logprobs(policy, batch, memory, rollouts.tokens, rollouts.mask, model.latent_id,
                                       batch_features, config.temperature)
            result = clipped_policy_loss(logp, logp_f, advantages, rollouts.mask, config.epsilon, config.epsilon_high,
                                         config.loss_type, config.max_new_tokens, config.beta, ref_logp)
            accelerator.backward(result.loss)
            accelerator.clip_grad_norm_(policy.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

        step_seconds.append(time.perf_counter() - step_start)
        if step % config.log_every == 0 or step == config.max_steps - 1:
            generated = float(rollouts.mask.sum())
            logs = {"loss": result.loss.item(), "reward_mean": float(rewards.mean()),
                    "reward_std": float(rewards.std()),
                    "r_acc": float(r_acc.mean()), "r_causal": float(r_causal.mean()),
                    "zero_std_groups": zero_std_fraction(rewards, G), "clip_fraction": result.clip_fraction,
                    "kl": result.kl, "generated_tokens_per_s": generated / max(rollouts.seconds, 1e-9),
                    "lr": scheduler.get_last_lr()[0]}
            accelerator.log(logs, step=step)
            bar.set_postfix(r_acc=f"{logs['r_acc']:.2f}", r_causal=f"{logs['r_causal']:.2f}")
        done = step + 1
        if accelerator.is_main_process and (done % config.save_every == 0 or done == config.max_steps):
            trainer.save_checkpoint(output, done, unwrapped, optimizer, scheduler, extra={"causal_record": record})
        if on_step is not None:
            on_step(done)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped.eval()
        model.save_pretrained(output)
        summary = {"mean_causal_reward_correct": _mean(record["correct"]),
                   "mean_causal_reward_wrong": _mean(record["wrong"]),
                   "n_correct": len(record["correct"]), "n_wrong": len(record["wrong"]),
                   "recorded_from_step": record_from, "step_seconds_this_run": step_seconds}
        (output / "causal_reward_summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()
    return output


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
