"""Plumbing shared by the recipes: accelerator, data order, optimiser, schedule, checkpoints with exact resume.

Data order is a pure function of (seed, step): each epoch is a seeded permutation, each step takes the next global
batch and each rank its slice. Resuming from a checkpoint therefore needs only the step number, and a 2-process run
sees the same global batches as a 1-process run.

A checkpoint records the settings of the run that wrote it (`run_settings`); `resume_point` refuses to start a new run
over another run's checkpoints (its pruning would delete them, or they its own) and to resume with other settings, and
it skips a damaged checkpoint (an empty or missing file, as a power loss leaves) for the previous intact one, naming
the file. Checkpoint files are fsynced before the folder is renamed into place.

One run per output folder at a time: a recipe decorated with `one_run_per_folder` holds the folder's OS lock
(`locking.exclusive_output`, rank 0 for the whole launch) from `make_accelerator` (after its settings are checked, so
a refused config writes nothing) until it returns or raises; a second run into the same folder stops at once.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from medsynapse.locking import fsync_tree, hold_for_launch, writes_into

CHECKPOINTS = "checkpoints"
SHARDED = "sharded"  # a sharded checkpoint's torch.distributed.checkpoint folder
CHECKPOINT_FILES = ("weights.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")
# settings that change neither what is trained nor in what order: a resume may change them
# how, not what, is trained: a checkpoint may be resumed with other values (`distributed`: a sharded checkpoint also
# resumes in one process or under DDP; an unsharded one under FSDP2 is refused by load_checkpoint, with the reason)
RESUMABLE_SETTINGS = ("resume", "save_every", "log_every", "output_dir", "prior_cache", "distributed", "report_to")
# Settings added after runs were first recorded, left out of a run's recorded settings while at these values (what
# every run before they existed did): checkpoints, pipeline manifests, study units and config hashes written earlier
# still match.
NEUTRAL_DEFAULTS = {"max_images": 1, "engine": "hf", "jsd_positions": "all", "adapt_steps": 0, "adapt_lr": 1e-4}


def recorded_settings(values: dict) -> dict:
    """`values` without the settings a resume may change and the new settings at their neutral defaults."""
    return {k: v for k, v in values.items()
            if k not in RESUMABLE_SETTINGS and not (k in NEUTRAL_DEFAULTS and v == NEUTRAL_DEFAULTS[k])}
# where a run's logs go (accelerate's trackers): TensorBoard files in the output folder, a service only when asked
REPORTERS = ("tensorboard", "wandb", "mlflow", "none")
_RUN_LOCKS: ContextVar[ExitStack | None] = ContextVar("medsynapse_run_locks", default=None)


def one_run_per_folder(train: Callable) -> Callable:
    """Decorate a recipe `train(config, ...)`: the output-folder lock `make_accelerator` takes is released when the
    recipe returns or raises (also in-process, so a crashed run can be resumed by the same process)."""
    @functools.wraps(train)
    def wrapper(*args, **kwargs):
        with ExitStack() as stack:
            token = _RUN_LOCKS.set(stack)
            try:
                return train(*args, **kwargs)
            finally:
                _RUN_LOCKS.reset(token)
    return wrapper


def make_accelerator(output_dir: str | Path, report_to: str = "tensorboard") -> Accelerator:
    """CPU or GPU, one process or DDP as `accelerate launch` / `torchrun` set it up; TensorBoard logs in output_dir.

    `split_batches=True` states the recipes' convention: `batch_size` is the global batch and each rank takes its
    slice (`rank_slice`), so one optimizer step is one step of the schedule whatever the number of processes. Without
    it, accelerate assumes per-process batches and steps a prepared scheduler once per process at every optimizer step
    (an N-process run would go through the learning-rate schedule N times too fast). The recipes prepare no data
    loader, so the flag changes nothing else.
    """
    check_report_to(report_to)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=None if report_to == "none" else report_to,
                              project_dir=str(output_dir),
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    check_supported(accelerator.distributed_type)
    stack = _RUN_LOCKS.get()
    if stack is not None:
        hold_for_launch(stack, output_dir, "training run", accelerator.is_main_process, accelerator.num_processes)
    return accelerator


def check_report_to(report_to: str) -> None:
    """A known tracker whose package is installed (wandb and mlflow are not dependencies), before anything runs."""
    import importlib.util

    if report_to not in REPORTERS:
        raise ValueError(f"report_to {report_to!r}: expected one of {REPORTERS}")
    if report_to in ("wandb", "mlflow") and importlib.util.find_spec(report_to) is None:
        raise ValueError(f"report_to {report_to!r} needs the {report_to} package: pip install {report_to}")


def training_record(config, recipe: str) -> dict:
    """What the model card says about the training: recipe, the settings that shape the weights and their hash."""
    import hashlib

    settings = run_settings(config)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    source = getattr(config, "model", "") or getattr(config, "vlm", "")
    return {"recipe": recipe, "config_hash": digest, "source": str(source), "settings": settings}


def answer_window(labels: torch.Tensor) -> int:
    """How many trailing positions hold every answer token, plus the one that predicts the first answer token."""
    answer_columns = (labels != -100).any(0).nonzero()
    if len(answer_columns) == 0:
        raise ValueError("batch has no answer tokens")
    return labels.shape[1] - int(answer_columns[0]) + 1


def answer_loss(policy, batch, memory: torch.Tensor | None, latent_id: int, features=None,
                reduction: str = "token") -> torch.Tensor:
    """Teacher-forced next-token loss on the answer tokens (memory or thoughts spliced into the slots, or none);
    only the answer window's logits are computed (the same value as full logits; an 8B VLM's (B, T, V) logits would
    dominate memory). Shared by SFT, CoT-SFT and the latent baselines."""
    from medsynapse.model.vlm import forward_with_memory
    from medsynapse.objectives.ntp import answer_nll

    keep = answer_window(batch.labels)
    logits = forward_with_memory(policy, batch, memory, latent_id, features=features, labels=None,
                                 logits_to_keep=keep).logits
    return answer_nll(logits, batch.labels[:, -keep:], reduction)


def require_one_process(accelerator: Accelerator, recipe: str, sharded_alternative: bool = False) -> None:
    """The latent baselines run several forwards of the model before one backward, which DDP does not allow (FSDP2
    does: `distributed: fsdp`, where the recipe supports it)."""
    if accelerator.num_processes > 1:
        hint = "; set `distributed: fsdp` to train it sharded" if sharded_alternative else ""
        raise NotImplementedError(f"{recipe} trains in one process under DDP: each step runs several forwards of the "
                                  f"model before one backward, which DDP does not allow{hint}")


def end_training(accelerator: Accelerator) -> None:
    """Close the trackers but keep the process group: `Accelerator.end_training` destroys it, and a pipeline runs
    several recipes in one process under torchrun (the CLI destroys the group when the command ends)."""
    for tracker in accelerator.trackers:
        tracker.finish()


def check_supported(distributed_type) -> None:
    """Refuse accelerate's own sharding plugins before any work is done, rather than fail (or save garbage) later.

    Sharding is the recipes' `distributed: fsdp` setting under a DDP launch (torchrun, or configs/accelerate/ddp.yaml):
    recipes/sharding.py chooses the FSDP2 units so that the vision tower, the embeddings and lm_head can be called
    outside the VLM's forward, and keeps the small trainable modules replicated. Accelerate's FSDP plugin would wrap
    the modules its way (the trainable sampler alone, say) and DeepSpeed ZeRO-3 partitions parameters that the
    recipes read directly (docs/distributed.md, "Sharded training").
    """
    from accelerate.utils import DistributedType

    if distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise NotImplementedError(
            f"{distributed_type.value} launches are not supported by the MedSynapse recipes: launch with torchrun or "
            "configs/accelerate/ddp.yaml and set `distributed: fsdp` in the stage's settings to shard the VLM "
            "(FSDP2). See docs/distributed.md, 'Sharded training'.")


def global_batch_indices(n_items: int, global_batch: int, step: int, seed: int) -> list[int]:
    """Indices of the global batch for `step`: epoch permutations laid end to end, no sample dropped."""
    start = step * global_batch
    out: list[int] = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n_items)
        perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        out.extend(perm[offset:offset + global_batch - len(out)])
    return out


def rank_slice(indices: list[int], rank: int, world: int) -> list[int]:
    if len(indices) % world:
        raise ValueError(f"global batch {len(indices)} is not divisible by {world} processes")
    return [indices[p] for p in global_positions(len(indices), rank, world)]


def global_positions(global_batch: int, rank: int, world: int) -> list[int]:
    """Positions in the global batch of this rank's slice (what `rank_slice` takes)."""
    per = global_batch // world
    return list(range(rank * per, (rank + 1) * per))


def enable_activation_checkpointing(vlm) -> None:
    """Non-reentrant activation checkpointing of the VLM's layers, to trade compute for memory at 8B scale.

    Non-reentrant because the weights are frozen while gradients still flow through them to P_phi / LoRA / A_psi
    (reentrant checkpointing drops gradients when no layer input requires grad). Transformers checkpoints only in
    train mode, so the gradient-carrying forwards run in train mode; Qwen3-VL's dropout rates are 0, so no number
    changes (tested: same weights as without).
    """
    from medsynapse.model.vlm import core_vlm

    core_vlm(vlm).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def train_without_dropout(module: nn.Module) -> None:
    """Train mode (so activation checkpointing acts) with every dropout off: the frozen VLM's numbers must not change
    (a Stage II LoRA with lora_dropout > 0 would otherwise drop activations in Stage III's student passes)."""
    module.train()
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            sub.eval()


def adamw(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases, norms and gains (1-D parameters)."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999), eps=1e-8)


def cosine_schedule(optimizer, total_steps: int, warmup_ratio: float):
    return get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * total_steps), total_steps)


def check_steps(max_steps: int, minimum: int = 0) -> None:
    """Refuse a step count below `minimum` (0 where 0 means "use epochs") before anything is loaded."""
    if not isinstance(max_steps, int) or max_steps < minimum:
        meaning = " (0: use epochs)" if minimum == 0 else ""
        raise ValueError(f"max_steps must be an integer >= {minimum}{meaning}, got {max_steps!r}")


def check_positive(config, names: tuple[str, ...]) -> None:
    """Every named setting must be a finite number > 0: checked before anything is loaded, naming the setting
    (a zero batch size or save interval would otherwise fail later with an unrelated error)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a number > 0, got {value!r}")


def check_paths(config, names: tuple[str, ...]) -> None:
    """Every named path setting must be given (an empty `vlm:` would otherwise surface as ".: no config.json")."""
    for name in names:
        if not str(getattr(config, name) or "").strip():
            raise ValueError(f"{name} is empty: set it to a local path (config file or --set {name}=PATH)")


def run_settings(config) -> dict:
    """The config as JSON values, without the settings a resume may change."""
    from medsynapse.config import to_dict

    values = json.loads(json.dumps(to_dict(config), default=str))
    return recorded_settings(dict(sorted(values.items())))


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """Every `step_*` folder (intact or not), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))


def damaged_file(folder: Path) -> Path | None:
    """The first file of a checkpoint that is missing or empty, or whose state.json does not parse; None if intact."""
    sharded = (folder / SHARDED).is_dir()  # weights and optimizer state in SHARDED/ (torch.distributed.checkpoint)
    names = [n for n in CHECKPOINT_FILES if n not in ("weights.safetensors", "optimizer.pt")] if sharded \
        else CHECKPOINT_FILES
    if sharded and not (folder / SHARDED / ".metadata").is_file():
        return folder / SHARDED / ".metadata"
    for name in names:
        path = folder / name
        if not path.is_file() or path.stat().st_size == 0:
            return path
    try:
        json.loads((folder / "state.json").read_text())["step"]
    except (ValueError, KeyError):
        return folder / "state.json"
    return None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest intact checkpoint; each newer damaged one is skipped with a warning naming its bad file."""
    for folder in reversed(checkpoint_folders(output_dir)):
        bad = damaged_file(folder)
        if bad is None:
            return folder
        warnings.warn(f"{folder}: damaged checkpoint ({bad} is missing or empty); trying the one before it",
                      stacklevel=2)
    return None


def resume_point(output_dir: str | Path, config, total_steps: int) -> Path | None:
    """The checkpoint this run continues from, or None for a fresh start; refuses to mix runs in one folder.

    Without `resume`, existing checkpoints mean another run owns the folder: ValueError (pruning would delete one
    run's checkpoints in favour of the other's). With `resume`: the newest intact checkpoint, which must have been
    written with the same settings (`run_settings`; checkpoints from before this check carry none and are accepted)
    and at a step within this run's `total_steps`.
    """
    existing = checkpoint_folders(output_dir)
    if not config.resume:
        if existing:
            raise ValueError(f"{Path(output_dir) / CHECKPOINTS} holds checkpoints of an earlier run (up to "
                             f"{existing[-1].name}); continue it with --resume (resume: true), or train into another "
                             "output_dir")
        return None
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is None:
        warnings.warn(f"resume: no intact checkpoint in {Path(output_dir) / CHECKPOINTS}; starting from step 0",
                      stacklevel=2)
        return None
    state = json.loads((checkpoint / "state.json").read_text())
    recorded = state.get("settings")
    if recorded is not None:
        wanted = run_settings(config)
        changed = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
        if changed:
            raise ValueError(f"{checkpoint}: written by a run with other settings ({', '.join(changed)} differ); "
                             "resume with the settings it was started with, or train into another output_dir")
    if state["step"] > total_steps:
        raise ValueError(f"{checkpoint}: step {state['step']} is past this run's {total_steps} steps; nothing would "
                         "be trained")
    return checkpoint


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters being trained (the sampler, the LoRA tensors, ...), detached."""
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    expected = trainable_state(module)
    if set(expected) != set(weights):
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise ValueError(f"checkpoint does not match the trainable parameters: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    with torch.no_grad():
        params = dict(module.named_parameters())
        for name, value in weights.items():
            params[name].copy_(value)


def save_checkpoint(output_dir: str | Path, step: int, module: nn.Module, optimizer, scheduler,
                    extra: dict | None = None, keep: int = 2, config=None) -> Path:
    """Trainable weights (safetensors), optimiser and scheduler state, RNG and the run's settings (`config`);
    written to a temp dir, fsynced, then renamed."""
    root = Path(output_dir) / CHECKPOINTS
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    with writes_into(root, f"checkpoint step {step}"), _removed_on_failure(tmp):
        tmp.mkdir(parents=True)
        trainable = {k: v.contiguous() for k, v in trainable_state(module).items()}
        save_file(trainable, str(tmp / "weights.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
        settings = {"settings": run_settings(config)} if config is not None else {}
        (tmp / "state.json").write_text(json.dumps({"step": step, **settings, **(extra or {})}))
        fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@contextmanager
def _removed_on_failure(folder: Path) -> Iterator[None]:
    """A half-written checkpoint folder is removed when its writing fails (a full disk gets its space back; resume
    never reads it either way: it is not a `step_*` folder)."""
    try:
        yield
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, module: nn.Module, optimizer, scheduler,
               sharded: bool = False, extra: dict | None = None, config=None) -> None:
    """Call on every rank at a save point: the main process writes `save_checkpoint`, or, `sharded`, every rank
    writes its shards (`save_sharded_checkpoint`)."""
    if sharded:
        save_sharded_checkpoint(accelerator, output_dir, step, module, optimizer, scheduler, extra=extra,
                                config=config)
    elif accelerator.is_main_process:
        save_checkpoint(output_dir, step, module, optimizer, scheduler, extra=extra, config=config)


def save_sharded_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, module: nn.Module,
                            optimizer, scheduler, extra: dict | None = None, keep: int = 2, config=None) -> Path:
    """`save_checkpoint` for a module whose trainable parameters are sharded (FSDP2): called on every rank, each
    writes its shards of the trainable weights and of the optimizer state with torch.distributed.checkpoint
    (CHECKPOINT/sharded/); the main process writes the rest and renames the folder once every rank has finished."""
    import torch.distributed.checkpoint as dcp

    root = Path(output_dir) / CHECKPOINTS
    final, tmp = root / f"step_{step:07d}", root / f".tmp_step_{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    dcp.save(_sharded_state(module, optimizer), checkpoint_id=str(tmp / SHARDED))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with writes_into(root, f"checkpoint step {step}"), _removed_on_failure(tmp):
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
            settings = {"settings": run_settings(config)} if config is not None else {}
            (tmp / "state.json").write_text(json.dumps({"step": step, "sharded": True, **settings,
                                                        **(extra or {})}))
            fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        for old in sorted(root.glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _sharded_state(module: nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return {"model": {name: p.detach() for name, p in module.named_parameters() if p.requires_grad},
            "optimizer": get_optimizer_state_dict(module, inner)}


def load_checkpoint(folder: Path, module: nn.Module, optimizer, scheduler, sharded: bool = False) -> dict:
    """Restore what `save_checkpoint` or `save_sharded_checkpoint` wrote (tensors only: `weights_only=True`); returns
    the state dict. A sharded checkpoint loads on any number of ranks, sharded or not (torch.distributed.checkpoint
    reads each rank's slices; every rank calls this); an unsharded one into a sharded run is refused."""
    written_sharded = (folder / SHARDED).is_dir()
    if sharded and not written_sharded:
        raise ValueError(f"{folder}: written without sharding (distributed: ddp or one process); resume it that way")
    if written_sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        state = _sharded_state(module, optimizer)
        dcp.load(state, checkpoint_id=str(folder / SHARDED))  # in place: the parameters' own shards
        set_optimizer_state_dict(module, getattr(optimizer, "optimizer", optimizer), state["optimizer"])
    else:
        load_trainable_state(module, load_file(str(folder / "weights.safetensors")))
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    torch.set_rng_state(torch.load(folder / "rng.pt", weights_only=True)["torch"])
    return json.loads((folder / "state.json").read_text())
