"""Stage II, Causal Counterfactual Refinement: GRPO on an LLM LoRA with R = λ_acc·r_acc + λ_causal·r_causal.

`causal_form: paper` (default) is that reward with Eq. 5 as is; `causal_form: ranked` squashes r_causal to
λ_causal·(1 − 1e-3)·tanh(r_causal / causal_scale) with 2·λ_causal ≤ λ_acc, so correctness always ranks first and
r_causal only orders rollouts of equal correctness (objectives/rewards.py); use it with `advantage_std_floor: 0.5`.

Per step, top to bottom:
1. B prompts; their prior tokens (cached table), memory M and counterfactual memory M' (frozen sampler, no grad) and
   vision features are computed once per prompt and reused by every rollout and every pass below.
2. G rollouts per prompt in one batched, KV-cached `generate` over the B·G batch (eval mode: no dropout), or with
   `engine: vllm` from a colocated vLLM engine that first loads the LoRA-changed weights as the last optimiser step
   left them (merged), given the same memory rows; every log-prob below still comes from the training model.
3. r_acc from the shared answer extraction; r_causal from ONE no-grad forward over 2·B·G rows (M rows, then M' rows),
   from the policy's own distribution (log-softmax of the unscaled logits, T = 1). The M rows' log-probs at the
   sampling temperature, from the same logits, are the old log-probs of the clipped ratio (same policy, same mode,
   as TRL scales them): no extra pass.
4. Group-normalised advantages (optionally with a σ floor); `num_iterations` optimisation passes with the clipped
   surrogate (+ optional k3 KL to the adapter-disabled model).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from medsynapse.answers import check_answer_format
from medsynapse.config import to_dict
from medsynapse.data.dataset import VQADataset, check_image_limit, training_dataset
from medsynapse.engines import Engine, check_engine
from medsynapse.model.counterfactual import TOKEN_INTERVENTIONS
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.sampling import row_keys, sampling_kwargs
from medsynapse.model.vlm import (
    completion_logprobs,
    completion_logprobs_at,
    completion_mask,
    select_features,
    vision_features,
)
from medsynapse.objectives.grpo import clipped_policy_loss, group_advantages, zero_std_fraction
from medsynapse.objectives.rewards import (
    CAUSAL_FORMS,
    CAUSAL_GATES,
    CAUSAL_REDUCTIONS,
    accuracy_rewards,
    causal_rewards,
    centred_causal,
    check_centred,
    check_ranked,
    composite_reward,
)
from medsynapse.recipes import sharding, trainer
from medsynapse.recipes.config_base import (
    AnswerFormat,
    Distributed,
    LoRAConfig,
    LossType,
    RolloutSampling,
    TrainingConfig,
)
from medsynapse.recipes.engine_rollouts import Rollouts, engine_logprob_gap, rollouts_from_engine, start_engine
from medsynapse.recipes.priors import attach_reference_bank, prior_table, select_priors


@dataclass
class Stage2Config(TrainingConfig, LoRAConfig):
    model: str = ""  # a Stage I folder (sampler + VLM + encoder); a plain VLM folder with use_memory: false
    use_memory: bool = True  # false: plain GRPO on the VLM (no memory, λ_causal must be 0), e.g. to compare with TRL
    output_dir: str = "runs/stage2"
    group_size: int = 4
    batch_size: int = 8  # prompts per step (global); each has group_size rollouts
    max_steps: int = 200
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    temperature: float = 0.7
    top_p: float = 0.95
    # keyed: per-rollout noise from (seed, step, position), the same on any world size (model/sampling.py) | torch:
    # transformers' sampler on the process RNG
    rollout_sampling: RolloutSampling = "keyed"
    max_new_tokens: int = 16
    lambda_acc: float = 1.0
    lambda_causal: float = 0.5
    causal_reduction: str = "sum"  # sum (paper Eq. 5) | mean
    causal_clip: float | None = None
    causal_gate: str = "none"  # none (paper) | correct (r_causal credited to correct rollouts only); paper form only
    causal_form: str = "paper"  # paper: λ_acc·r_acc + λ_causal·r_causal (Eq. 5 as is) | ranked: λ_acc·r_acc +
    # λ_causal·0.999·tanh(r_causal / causal_scale), needs 2·λ_causal ≤ λ_acc: every correct rollout outranks every
    # wrong one, r_causal orders rollouts of equal correctness | centred (recommended): A = GRPO advantage of
    # λ_acc·r_acc + λ_causal·c, c = r_causal z-scored within each group's correct and wrong rollouts, |c| ≤ 1: the
    # push from wrong to right is plain GRPO's, r_causal reorders within a class (objectives/rewards.py)
    causal_scale: float = 1.0  # ranked: r_causal (nats) at which the bonus is tanh(1) ≈ 0.76 of its bound;
    # centred: the floor of the within-class σ (nats), so rounding-level differences give c ≈ 0
    advantage_std_floor: float = 0.0  # A = (R − mean) / max(σ + eps, floor); 0 = TRL. With ranked use λ_acc/2 = 0.5:
    # the std of a G = 4 group with one right answer, so a group of equal correctness, whose reward spread comes from
    # r_causal alone, never gets larger advantages than a group split by correctness (r_causal 1e-3 nats apart:
    # |A| ≤ 1e-3). On the demo (3 seeds) 0.5 and 0.1 did not differ (0.422 ± 0.092 vs 0.432 ± 0.133; an earlier README)
    intervention: str = "zero"  # zero (paper) | drop | inpaint | reference (model/counterfactual.py)
    reference_bank_size: int = 256  # the `reference` bank, rebuilt from this run's training images and saved
    loss_type: LossType = "grpo"  # grpo | dr_grpo | dapo
    epsilon: float = 0.2
    epsilon_high: float | None = None
    num_iterations: int = 1
    beta: float = 0.0  # KL to the adapter-disabled model
    advantage_eps: float = 1e-4
    answer_types: list[str] = field(default_factory=lambda: ["yes_no", "multiple_choice", "open"])
    record_last_fraction: float = 0.2  # r_causal of correct / wrong rollouts is summarised over this tail
    save_every: int = 50
    log_every: int = 1
    gradient_checkpointing: bool = False  # non-reentrant, on the VLM layers: less activation memory
    answer_format: AnswerFormat = "direct"  # direct | reasoning: prompts ask for an analysis then <answer></answer>
    prior_cache: str = ""  # folder of `medsynapse cache-features` shards; read when present, filled when missing
    # ddp: every rank holds the VLM | fsdp: the VLM and its LoRA sharded over the ranks (recipes/sharding), sharded
    # checkpoints (torch.distributed.checkpoint), the same single-folder output
    distributed: Distributed = "ddp"
    # hf: transformers' generate | vllm: rollouts from a vLLM engine in this process's care (needs .venv-vllm, one
    # process), the policy's merged LoRA weights loaded into it before every step; draws are vLLM's, seeded per
    # prompt from the same keys (docs/vllm.md)
    engine: Engine = "hf"


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


def engine_rollouts(engine, model: MedSynapseV, dataset: VQADataset, indices: list[int], memory: torch.Tensor | None,
                    config: Stage2Config, keys: torch.Tensor) -> Rollouts:
    """All B·G rollouts from the vLLM engine (`engine: vllm`), each prompt's G draws seeded by its first row key."""
    G = config.group_size
    return rollouts_from_engine(engine, model, dataset, indices, None if memory is None else memory[::G], G,
                                config.max_new_tokens, config.temperature, config.top_p, keys[::G])


class RolloutLogprobs(NamedTuple):
    """Per-token log-probs (N, T) of the rollouts, 0 where masked."""

    old: torch.Tensor  # log π(o_t | M) at the sampling temperature: the clipped ratio's old log-probs (as TRL)
    factual: torch.Tensor  # log π(o_t | M) at T = 1: Eq. 5's numerator
    counterfactual: torch.Tensor  # log π(o_t | M') at T = 1: Eq. 5's denominator


@torch.no_grad()
def factual_and_counterfactual_logprobs(policy, batch, memory, memory_cf, rollouts: Rollouts, features,
                                        latent_id: int, temperature: float) -> RolloutLogprobs:
    """One forward over the two memory conditions stacked (M rows, then M' rows).

    r_causal reads the policy's own distribution, log-softmax of the unscaled logits (T = 1): Eq. 5 is about π_θ,
    and the sampling temperature is a property of the sampler (at T = 0.5 every log-ratio would be doubled). The
    old log-probs of the clipped ratio stay at the sampling temperature, like the update pass's (TRL's convention);
    both come from the same logits, so no extra forward (equal tensors when `temperature` is 1).
    """
    n = rollouts.tokens.shape[0]
    both = batch.select(list(range(n)) * 2)
    both_features = None if features is None else select_features(features, batch.image_rows(list(range(n))) * 2)
    at_sampling, at_one = completion_logprobs_at(policy, both, torch.cat([memory, memory_cf]),
                                                 rollouts.tokens.repeat(2, 1), rollouts.mask.repeat(2, 1), latent_id,
                                                 features=both_features, temperatures=(temperature, 1.0))
    return RolloutLogprobs(at_sampling[:n], at_one[:n], at_one[n:])


def check_config(config: Stage2Config) -> None:
    """ValueError for reward / advantage settings that are unknown or break the chosen form's guarantees."""
    if config.causal_form not in CAUSAL_FORMS:
        raise ValueError(f"unknown causal_form {config.causal_form!r}; expected one of {CAUSAL_FORMS}")
    if config.causal_gate not in CAUSAL_GATES:
        raise ValueError(f"unknown causal_gate {config.causal_gate!r}; expected one of {CAUSAL_GATES}")
    if config.causal_reduction not in CAUSAL_REDUCTIONS:
        raise ValueError(f"unknown causal_reduction {config.causal_reduction!r}; expected one of {CAUSAL_REDUCTIONS}")
    check_answer_format(config.answer_format)
    if config.intervention not in TOKEN_INTERVENTIONS:
        raise ValueError(f"intervention {config.intervention!r} cannot train Stage II (it reads cached prior tokens); "
                         f"expected one of {TOKEN_INTERVENTIONS}")
    if config.causal_clip is not None and not config.causal_clip > 0:
        raise ValueError(f"causal_clip must be > 0 or null, got {config.causal_clip}")
    if not (math.isfinite(config.advantage_std_floor) and config.advantage_std_floor >= 0):
        raise ValueError(f"advantage_std_floor must be a finite number >= 0, got {config.advantage_std_floor}")
    if not (math.isfinite(config.temperature) and config.temperature > 0):
        raise ValueError(f"temperature must be > 0, got {config.temperature}")
    if config.causal_form == "centred":
        check_centred(config.lambda_acc, config.lambda_causal, config.advantage_std_floor, config.advantage_eps)
    if config.causal_form != "paper" and not (math.isfinite(config.causal_scale) and config.causal_scale > 0):
        raise ValueError(f"causal_scale must be a positive finite number of nats, got {config.causal_scale}")
    if config.causal_form != "paper" and config.causal_gate != "none":
        raise ValueError(f"causal_gate is a paper-form option; causal_form {config.causal_form!r} already ranks "
                         "every correct rollout first and keeps the order of the wrong ones (set causal_gate: none)")
    if config.causal_form != "paper" and config.causal_clip is not None:
        raise ValueError(f"causal_clip is a paper-form option; causal_form {config.causal_form!r} bounds r_causal "
                         "itself, with tanh (ranked) or a floored z-score (centred); set causal_clip: null, and "
                         "causal_scale for its scale")
    if config.causal_form == "ranked":
        check_ranked(config.lambda_acc, config.lambda_causal, config.causal_scale)


def rewards_and_advantages(r_acc: torch.Tensor, r_causal: torch.Tensor,
                           config: Stage2Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, A) per rollout. "paper" / "ranked": A = GRPO's group advantage of R. "centred": R = λ_acc·r_acc and
    A = its group advantage + λ_causal·c, c = r_causal centred within each group's classes of equal correctness."""
    G = config.group_size
    if config.causal_form == "centred":
        rewards = config.lambda_acc * r_acc
        advantages = group_advantages(rewards, G, config.advantage_eps, std_floor=config.advantage_std_floor)
        causal = centred_causal(r_acc, r_causal, G, config.causal_scale).to(advantages.dtype)
        return rewards, advantages + config.lambda_causal * causal
    rewards = composite_reward(r_acc, r_causal, config.causal_form, config.lambda_acc, config.lambda_causal,
                               config.causal_gate, config.causal_scale)
    return rewards, group_advantages(rewards, G, config.advantage_eps, std_floor=config.advantage_std_floor)


def inverted_group_fraction(r_acc: torch.Tensor, rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups where some wrong rollout's R ≥ some correct rollout's R (accuracy-only ranks them below).

    Always 0 for the ranked form; the paper form's r_causal can invert them (the reward hacking in docs/design.md,
    Stage II).
    """
    acc, reward = r_acc.view(-1, group_size) > 0, rewards.view(-1, group_size)
    lowest_correct = reward.masked_fill(~acc, float("inf")).amin(dim=1)
    highest_wrong = reward.masked_fill(acc, float("-inf")).amax(dim=1)
    return float((highest_wrong >= lowest_correct).float().mean())


@trainer.one_run_per_folder
def train_stage2(config: Stage2Config, on_step: Callable[[int], None] | None = None) -> Path:
    check_config(config)
    check_engine(config.engine)
    sharding.check_distributed(config.distributed)
    trainer.check_steps(config.max_steps, minimum=1)  # before anything is loaded
    trainer.check_paths(config, ("model", "train_file"))
    trainer.check_positive(config, ("lora_r", "lora_alpha", "group_size", "batch_size", "lr", "max_new_tokens",
                                    "save_every", "log_every", "num_iterations"))
    output = Path(config.output_dir)
    accelerator = trainer.make_accelerator(output, config.report_to)
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
    sharded = config.distributed == "fsdp" and accelerator.num_processes > 1
    if sharded:  # on the CPU (no rank holds the whole VLM on its device), before the optimizer
        sharding.shard_vlm(model.vlm, accelerator, record=output)
    model.to(accelerator.device)
    if config.gradient_checkpointing:
        trainer.enable_activation_checkpointing(model.vlm)  # active in the train-mode update passes only

    dataset = training_dataset(config.train_file, model.prompts, config.families, config.answer_types,
                               with_answers=False, answer_format=config.answer_format)
    check_image_limit(dataset.samples, model.max_images, config.train_file)
    priors, prior_row = (prior_table(model.prior, model.encoder_path, dataset, cache_dir=config.prior_cache)
                         if config.use_memory else (None, None))
    if priors is not None:
        attach_reference_bank(model, priors, config.reference_bank_size, required=config.intervention == "reference")

    total_updates = config.max_steps * config.num_iterations
    optimizer = trainer.adamw(model.vlm, config.lr, config.weight_decay)
    scheduler = trainer.cosine_schedule(optimizer, total_updates, config.warmup_ratio)
    policy, optimizer, scheduler = sharding.prepare_policy(accelerator, model.vlm, optimizer, scheduler, sharded)
    unwrapped = accelerator.unwrap_model(policy)
    model.vlm = unwrapped

    start = 0
    record: dict[str, list[float]] = {"correct": [], "wrong": []}
    checkpoint = trainer.resume_point(output, config, config.max_steps)
    if checkpoint is not None:
        state = trainer.load_checkpoint(checkpoint, unwrapped, optimizer, scheduler, sharded=sharded)
        start, record = state["step"], state.get("causal_record", record)
    engine = start_engine(config.engine, model, config.seed, output, accelerator.num_processes)
    accelerator.init_trackers("stage2", config={k: str(v) for k, v in to_dict(config).items()})
    record_from = int(config.max_steps * (1 - config.record_last_fraction))

    bar = tqdm(range(start, config.max_steps), desc="stage2", disable=not accelerator.is_main_process,
               initial=start, total=config.max_steps)
    step_seconds: list[float] = []
    gaps: list[float] = []
    sync_seconds: list[float] = []
    rollout_seconds: list[float] = []
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
                assert priors is not None and prior_row is not None  # use_memory: prior_table made them
                prior, counts = select_priors(priors, prior_row, indices)
                prior = prior.to(accelerator.device)
                memory = model.memory(prior, images_per_sample=counts)[rows]
                memory_cf = model.memory(prior, "counterfactual", config.intervention, counts)[rows]
            features = vision_features(unwrapped, prompts)  # the vision tower has no LoRA: reused by every pass
        batch = prompts.select(rows)
        batch_features = select_features(features, prompts.image_rows(rows))
        rollout_samples = [dataset.samples[indices[r]] for r in rows]

        unwrapped.eval()
        keys = row_keys(config.seed, step, trainer.global_positions(config.batch_size, accelerator.process_index,
                                                                    accelerator.num_processes), G)
        if engine is not None:
            sync_start = time.perf_counter()
            engine.sync_weights(unwrapped)  # the policy as the last optimiser step (or the checkpoint) left it
            sync_seconds.append(time.perf_counter() - sync_start)
            rollouts = engine_rollouts(engine, model, dataset, indices, memory, config, keys)
        else:
            rollouts = generate_rollouts(model, batch, memory, batch_features, config, keys)
        r_acc = accuracy_rewards(rollouts.texts, rollout_samples, config.answer_format).to(accelerator.device)
        if config.lambda_causal != 0.0:
            scored = factual_and_counterfactual_logprobs(unwrapped, batch, memory, memory_cf, rollouts,
                                                         batch_features, model.latent_id, config.temperature)
            old_logp = scored.old
            at_one: torch.Tensor | None = scored.factual
            r_causal = causal_rewards(scored.factual, scored.counterfactual, rollouts.mask, config.causal_reduction,
                                      config.causal_clip)
        else:  # no counterfactual pass: only the old log-probs are needed
            with torch.no_grad():
                old_logp = completion_logprobs(unwrapped, batch, memory, rollouts.tokens, rollouts.mask,
                                               model.latent_id, batch_features, config.temperature)
            at_one = old_logp if config.temperature == 1 else None
            r_causal = torch.zeros_like(r_acc)
        if rollouts.engine_logprobs is not None and at_one is not None:  # does the engine sample this policy?
            gaps.append(engine_logprob_gap(rollouts.engine_logprobs, at_one, rollouts.mask))
        rewards, advantages = rewards_and_advantages(r_acc, r_causal, config)
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
            result = clipped_policy_loss(logp, old_logp, advantages, rollouts.mask, config.epsilon, config.epsilon_high,
                                         config.loss_type, config.max_new_tokens, config.beta, ref_logp)
            accelerator.backward(result.loss)
            accelerator.clip_grad_norm_(policy.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

        step_seconds.append(time.perf_counter() - step_start)
        rollout_seconds.append(rollouts.seconds)
        if step % config.log_every == 0 or step == config.max_steps - 1:
            generated = float(rollouts.mask.sum())
            logs = {"loss": result.loss.item(), "reward_mean": float(rewards.mean()),
                    "reward_std": float(rewards.std()),
                    "r_acc": float(r_acc.mean()), "r_causal": float(r_causal.mean()),
                    "zero_std_groups": zero_std_fraction(rewards, G), "clip_fraction": result.clip_fraction,
                    "inverted_groups": inverted_group_fraction(r_acc, rewards, G),
                    "advantage_abs_mean": float(advantages.abs().mean()),
                    "kl": result.kl, "generated_tokens_per_s": generated / max(rollouts.seconds, 1e-9),
                    "lr": scheduler.get_last_lr()[0]}
            if gaps:
                logs["engine_logprob_gap"] = gaps[-1]
            correct = r_acc > 0
            if config.lambda_causal != 0.0 and bool(correct.any()):
                logs["r_causal_correct"] = float(r_causal[correct].mean())
            if config.lambda_causal != 0.0 and bool((~correct).any()):
                logs["r_causal_wrong"] = float(r_causal[~correct].mean())
            accelerator.log(logs, step=step)
            bar.set_postfix(r_acc=f"{logs['r_acc']:.2f}", r_causal=f"{logs['r_causal']:.2f}")
        done = step + 1
        if done % config.save_every == 0 or done == config.max_steps:
            trainer.checkpoint(accelerator, output, done, unwrapped, optimizer, scheduler, sharded,
                               extra={"causal_record": record}, config=config)
        if on_step is not None:
            on_step(done)

    accelerator.wait_for_everyone()
    adapter = sharding.adapter_state(unwrapped, sharded)
    if accelerator.is_main_process:
        unwrapped.eval()
        model.answer_format = config.answer_format  # eval and predict prompt and score the model as it was trained
        model.save_pretrained(output, adapter_state=adapter, training=trainer.training_record(config, "stage2"))
        summary = {"mean_causal_reward_correct": _mean(record["correct"]),
                   "mean_causal_reward_wrong": _mean(record["wrong"]),
                   "n_correct": len(record["correct"]), "n_wrong": len(record["wrong"]),
                   "recorded_from_step": record_from, "step_seconds_this_run": step_seconds,
                   "rollout_seconds_this_run": rollout_seconds,
                   **({"engine": config.engine, "engine_logprob_gap_per_step": gaps,
                       "engine_sync_seconds_per_step": sync_seconds} if engine is not None else {})}
        (output / "causal_reward_summary.json").write_text(json.dumps(summary, indent=2))
    if engine is not None:
        engine.close()
    trainer.end_training(accelerator)
    return output


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
