"""Driver for tests/test_distributed.py, run as a script by `python` or `torchrun` (not collected by pytest).

    distributed_probe.py recipe OUT medsynapse-args...      run `medsynapse ARGS` in this process, recording
    distributed_probe.py plumbing OUT TOTAL WARMUP RESUME_AT  the trainer plumbing alone on a toy module, saving a
                                                              checkpoint after RESUME_AT steps and resuming from it
                                                              into fresh objects
    distributed_probe.py generate OUT VLM TEST_FILE          a plain VLM sharded by FSDP2 (recipes/sharding.shard_vlm)
                                                              answers the test file's first questions greedily, rank
                                                              R with 2 + 4 R new tokens at most (the ranks stop at
                                                              different steps); OUT/answers.rank{R}.json

`recipe` and `plumbing` record the learning rate of every optimizer step as the optimizer saw it when it stepped (a
global step pre-hook: what was used, not what a log says) in OUT/lrs.rank{RANK}.json. `recipe` also writes, on rank
0, the trained module's parameters when its optimizer was built and when the run ended (OUT/before.safetensors,
OUT/after.safetensors), so a test can check how far the weights moved.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from medsynapse.recipes import trainer

RANK = int(os.environ.get("RANK", "0"))
if os.environ.get("PROBE_FLOAT64"):  # modules built by the recipes (sampler, LoRA, A_psi) in float64 too
    from medsynapse.model.encoders.tiny_seg import TinySegEncoder

    torch.set_default_dtype(torch.float64)
    encode_pixels = TinySegEncoder.encode_pixels
    TinySegEncoder.encode_pixels = lambda self, pixels: encode_pixels(self, pixels.double())


def record_learning_rates() -> list[list[float]]:
    used: list[list[float]] = []
    register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: used.append(
        [group["lr"] for group in optimizer.param_groups]))
    return used


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors, whole (a sharded one is gathered: every rank calls this)."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).clone().contiguous()
            for name, p in trainer.trainable_state(module).items()}


def recipe(out: Path, args: list[str]) -> int:
    from medsynapse import cli

    used = record_learning_rates()
    trained: list[tuple[torch.nn.Module, dict[str, torch.Tensor]]] = []
    build_optimizer = trainer.adamw

    def adamw(module, lr, weight_decay):  # every recipe builds its one optimizer here
        trained.append((module, snapshot(module)))
        return build_optimizer(module, lr, weight_decay)

    trainer.adamw = adamw
    end_process_group, cli._end_process_group = cli._end_process_group, lambda: None  # gather the shards first
    code = cli.main(args)
    module, before = trained[0]  # the first optimizer's module (Coconut builds one per curriculum stage)
    after = snapshot(module)
    end_process_group()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"lrs.rank{RANK}.json").write_text(json.dumps(used))
    if RANK == 0:
        save_file(before, str(out / "before.safetensors"))
        save_file(after, str(out / "after.safetensors"))
    return code or 0


def plumbing(out: Path, total: int, warmup_ratio: float, resume_at: int) -> int:
    """make_accelerator + adamw + cosine_schedule + prepare, as every recipe uses them, on a linear layer."""
    used = record_learning_rates()
    accelerator = trainer.make_accelerator(out / "run")

    def build():
        torch.manual_seed(0)
        module = torch.nn.Linear(4, 2)
        optimizer = trainer.adamw(module, 1e-3, 0.01)
        scheduler = trainer.cosine_schedule(optimizer, total, warmup_ratio)
        return accelerator.prepare(module, optimizer, scheduler)

    def train(wrapped, optimizer, scheduler, steps):
        for step in steps:
            rows = trainer.rank_slice(list(range(4)), accelerator.process_index, accelerator.num_processes)
            x = torch.arange(16.0).view(4, 4)[rows] / (step + 1)
            wrapped(x).pow(2).mean().backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    wrapped, optimizer, scheduler = build()
    train(wrapped, optimizer, scheduler, range(resume_at))
    if accelerator.is_main_process:
        trainer.save_checkpoint(out / "run", resume_at, accelerator.unwrap_model(wrapped), optimizer, scheduler)
    accelerator.wait_for_everyone()
    wrapped, optimizer, scheduler = build()  # a fresh process would start here
    state = trainer.load_checkpoint(trainer.latest_checkpoint(out / "run"), accelerator.unwrap_model(wrapped),
                                    optimizer, scheduler)
    train(wrapped, optimizer, scheduler, range(state["step"], total))
    (out / f"lrs.rank{RANK}.json").write_text(json.dumps(used))
    # as the recipes do: close the trackers, keep the process group (destroying it while the DDP module is alive
    # left a rank blocked in a futex when the module was freed afterwards; seen three times in this probe)
    trainer.end_training(accelerator)
    return 0


def generate(out: Path, vlm: str, test_file: str) -> int:
    """The first units called directly (vision tower, input embeddings) before any forward of the root, then
    `generate` with each rank stopping at its own length: needs the root set up and `synced_gpus`."""
    import torch.distributed as dist
    from accelerate import PartialState

    from medsynapse.data.images import load_image
    from medsynapse.data.schema import read_samples
    from medsynapse.model.medsynapse import MedSynapseV
    from medsynapse.model.vlm import is_sharded
    from medsynapse.recipes.sharding import local_fraction, shard_vlm

    state = PartialState(cpu=True)
    model = MedSynapseV.from_pretrained(vlm)
    shard_vlm(model.vlm, state)
    samples = read_samples(test_file)[:3]
    answers = model.answer([load_image(s.images[0]) for s in samples], [s.question for s in samples],
                           max_new_tokens=2 + 4 * state.process_index)
    (out / f"answers.rank{state.process_index}.json").write_text(json.dumps(
        {"answers": answers, "sharded": is_sharded(model.vlm), "local_fraction": local_fraction(model.vlm)}))
    dist.barrier()
    return 0


if __name__ == "__main__":
    mode, out, rest = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    out.mkdir(parents=True, exist_ok=True)
    code = (recipe(out, rest) if mode == "recipe" else generate(out, *rest) if mode == "generate"
            else plumbing(out, int(rest[0]), float(rest[1]), int(rest[2])))
    # Every result is on disk. Leave without interpreter finalisation: one gloo rank hung there three times (py-spy:
    # the main thread on this line after its work, a native thread in a futex wait: the DDP module freed after
    # accelerate had destroyed the process group), and the test then waited for its 900 s timeout.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
