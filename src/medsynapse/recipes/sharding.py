"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the VLM of a recipe: `distributed: fsdp` in a stage's settings.

Under DDP every rank holds the whole frozen VLM; under FSDP2 each rank holds 1/world of it and gathers one unit at a
time. The units (written here rather than with transformers' own FSDP plan, which applies at `from_pretrained` with a
model-wide device mesh and assumes every call goes through the model's forward: ours call the vision tower, the
input embeddings and lm_head directly):
- every decoder layer and every vision block (their LoRA tensors, trainable in Stage II, included: FSDP2 shards per
  parameter, frozen and trainable mixed);
- the vision tower's patch and position embeddings, merger and DeepStack mergers, each its own unit (the tower is
  called directly by `vision_features`, outside the VLM's forward);
- the input embeddings (called directly by the memory splice), lm_head, the language model's final norm;
- the VLM itself as the root (no parameters left), initialised at once so that the units above may be called in any
  order, outside the root's forward.
Not sharded: the prior encoder (frozen; the feature cache removes it from training), P_phi, A_psi and MCOUT's module
(small and trainable: they stay DDP-wrapped, replicated, as under DDP). Every rank runs every unit the same number of
times: each rank takes an equal slice of the global batch, every sample has an image, and generation runs until every
rank is done (transformers' `synced_gpus`, which model/vlm.generate_with_memory sets for a sharded VLM).
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor
    from transformers import Qwen3VLForConditionalGeneration

DISTRIBUTED = ("ddp", "fsdp")


def check_distributed(value: str) -> None:
    if value not in DISTRIBUTED:
        raise ValueError(f"unknown distributed {value!r}; expected one of {DISTRIBUTED}")


def units(core: Qwen3VLForConditionalGeneration) -> list[nn.Module]:
    """The FSDP2 units of a Qwen3-VL model (module docstring), root excluded. Leaves only around the vision and text
    models: fully_shard gives a unit a new class, and transformers finds a model's hidden-state recorders by its
    class name (output_hidden_states would come back empty)."""
    language, visual = core.model.language_model, core.model.visual
    return [*language.layers, *visual.blocks, visual.patch_embed, visual.pos_embed, visual.merger,
            *visual.deepstack_merger_list, language.embed_tokens, language.norm, core.lm_head]


def shard_vlm(vlm: nn.Module, accelerator, record: str | Path | None = None) -> None:
    """Shard the VLM (a Qwen3-VL model, or a peft model around one) over the launch's processes, in place; with
    `record` (an output folder), each rank writes what it holds to RECORD/sharding.rank{R}.json."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from medsynapse.model.vlm import core_vlm

    if accelerator.num_processes < 2:
        return  # one process: nothing to shard over
    core = core_vlm(vlm)
    if core.lm_head.weight is core.get_input_embeddings().weight:
        raise NotImplementedError("distributed: fsdp needs untied input and output embeddings (Qwen3-VL-4B/8B "
                                  "untie them); this model ties them")
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    owned = {id(p) for unit in units(core) for p in unit.parameters()}
    left = [name for name, p in core.named_parameters() if id(p) not in owned]
    if left:  # another architecture's parameters would land in the root unit, gathered for the whole run
        raise NotImplementedError(f"distributed: fsdp does not know which unit these VLM parameters go in: {left[:5]}")
    for unit in units(core):
        fully_shard(unit, mesh=mesh)  # from the CPU, each shard goes to the mesh's device
    fully_shard(core, mesh=mesh)
    set_up_root(core)
    if record is not None:
        Path(record).mkdir(parents=True, exist_ok=True)
        held = {"rank": accelerator.process_index, "world": accelerator.num_processes,
                "vlm_parameters": sum(p.numel() for p in vlm.parameters()), "vlm_local_fraction": local_fraction(vlm)}
        (Path(record) / f"sharding.rank{accelerator.process_index}.json").write_text(json.dumps(held))


def set_up_root(core: nn.Module) -> None:
    """FSDP2's root set-up, once, before any unit runs. FSDP2 does it in the root's first forward, but here the units
    are called directly (the vision tower, the input embeddings, lm_head) before any forward of the root, and the
    first unit called would take itself for the root. Torch's public way to run a method other than `forward`
    through FSDP, `register_fsdp_forward_method`, runs the root's pre- and post-forward around a method that does
    nothing, called once (the root holds no parameters: nothing is gathered)."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    name = "fsdp_root_set_up"  # an instance method (nn.Module types its attributes as Tensor | Module)
    setattr(core, name, types.MethodType(lambda self: None, core))
    register_fsdp_forward_method(core, name)
    getattr(core, name)()


def prepare_policy(accelerator, vlm: nn.Module, optimizer, scheduler, sharded: bool):
    """`accelerator.prepare` for a recipe that trains a LoRA inside the VLM: DDP-wrapped, or, sharded, the VLM as it
    is (FSDP2 reduce-scatters the LoRA's gradients itself). Returns (policy, optimizer, scheduler)."""
    if sharded:
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        return vlm, optimizer, scheduler
    return accelerator.prepare(vlm, optimizer, scheduler)


def adapter_state(vlm: nn.Module, sharded: bool) -> dict[str, torch.Tensor] | None:
    """The LoRA tensors gathered from their shards for `save_pretrained` (every rank takes part), None unsharded."""
    return full_state(vlm, lambda key: "lora_" in key) if sharded else None


def full_weight(linear: nn.Linear) -> torch.Tensor:
    """A (possibly sharded) module's weight as one tensor on every rank (a collective when sharded)."""
    weight = linear.weight.detach()
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight


def full_trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters as full tensors on every rank (a collective per sharded tensor: call on all ranks)."""
    return {name: (cast("DTensor", p.detach()).full_tensor() if hasattr(p, "full_tensor") else p.detach())
            for name, p in module.named_parameters() if p.requires_grad}


def full_state(module: nn.Module, keep) -> dict[str, torch.Tensor]:
    """`module.state_dict()` entries whose key passes `keep`, as full tensors (call on every rank)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach()
            for k, v in module.state_dict().items() if keep(k)}


def local_fraction(module: nn.Module) -> float:
    """The share of the module's parameter elements this rank holds (1.0 unsharded, ~1/world sharded)."""
    total = local = 0
    for p in module.parameters():
        total += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return local / max(total, 1)
