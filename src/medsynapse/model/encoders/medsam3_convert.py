"""Merge a MedSAM3 LoRA (`best_lora_weights.pt`, native `facebookresearch/sam3` names) into a transformers Sam3Model.

Usage: `python -m medsynapse.model.encoders.medsam3_convert --base DIR --lora FILE --out DIR [--alpha 32 --rank 8]`.
`--base` is a transformers `Sam3Model` folder (config `model_type` "sam3"; a `sam3_video` hub folder first goes
through `Sam3Model.from_pretrained(...).save_pretrained(DIR)`). The output is a new folder: the base files, the
safetensors with the merged weights, and `medsam3_merge.json` recording what was merged.

LoRA file (MedSAM3 v1, Joey-S-Liu/MedSAM3 `lora_layers.py`; same in its forks, e.g. Locutusque/MedSAM3): each
wrapped `nn.Linear` at native path `M` stores `M.lora.lora_A` with shape (in, r) and `M.lora.lora_B` with shape
(r, out); the layer computes `W x + (alpha / r) * x @ A @ B`, so the merged weight is `W + (alpha / r) * (A @ B).T`.
MedSAM3 first swaps every `nn.MultiheadAttention` for a module with separate `q_proj`/`k_proj`/`v_proj`/`out_proj`
Linear layers (rows 0:d, d:2d, 2d:3d of the native `in_proj_weight`), then wraps Linear layers whose name contains a
target (its config: q_proj, k_proj, v_proj, out_proj, fc1, fc2; the code's default also qkv, proj, c_fc, c_proj,
linear1, linear2). Also accepted: PEFT-style `M.lora_A.weight` (r, in) / `M.lora_B.weight` (out, r), merged as
`W + (alpha / r) * B @ A`, and a bare `M.lora_A` / `M.lora_B` in the MedSAM3 layout. A leading `module.` (DDP) is
dropped.

Native module -> transformers `Sam3Model` parameter. The renames are those of transformers' own converter
(`src/transformers/models/sam3/convert_sam3_to_hf.py` in huggingface/transformers; not shipped in the 5.24 wheel),
restricted to modules that hold Linear layers. Abbreviations: VB = `backbone.vision_backbone.trunk.blocks`,
VL = `vision_encoder.backbone.layers`, TB = `backbone.language_backbone.encoder.transformer.resblocks`,
TL = `text_encoder.text_model.encoder.layers`; X in q_proj, k_proj, v_proj (each from the native `in_proj_weight`)
or out_proj, and X' the same except out_proj -> o_proj.

| native module (LoRA on it) | transformers parameter |
| --- | --- |
| `VB.N.attn.qkv` (fused) | `VL.N.attention.{q,k,v}_proj.weight`, update rows split in thirds |
| `VB.N.attn.proj` | `VL.N.attention.o_proj.weight` |
| `VB.N.mlp.fc1 / fc2` | `VL.N.mlp.fc1 / fc2.weight` |
| `TB.N.attn.X` | `TL.N.self_attn.X.weight` (CLIP keeps out_proj) |
| `TB.N.mlp.c_fc / c_proj` | `TL.N.mlp.fc1 / fc2.weight` |
| `backbone.language_backbone.resizer` | `text_projection.weight` |
| `geometry_encoder.encode.N.{self_attn, cross_attn_image}.X` | `geometry_encoder.layers.N.{self_attn, cross_attn}.X'` |
| `transformer.encoder.layers.N.{self_attn, cross_attn_image}.X` | `detr_encoder.layers.N.{self_attn, cross_attn}.X'` |
| `transformer.decoder.layers.N.{self_attn, ca_text, cross_attn}.X` | `detr_decoder.layers.N.{self_attn,` |
| | `text_cross_attn, vision_cross_attn}.X'` |
| `{geometry_encoder.encode, transformer.encoder, transformer.decoder}` | the matching `...layers.N.mlp.fc1 / fc2` |
| `.layers.N.linear1 / linear2` (no `.layers` for geometry) | |
| `segmentation_head.cross_attend_prompt.X` | `mask_decoder.prompt_cross_attn.X'` |
| `dot_prod_scoring.prompt_proj / hs_proj` | `dot_product_scoring.text_proj / query_proj.weight` |

Any other module keeps its name (e.g. `geometry_encoder.boxes_direct_project`). Every mapped name must exist in the
base folder with the shape of the LoRA update, else the merge stops and names the LoRA key (nothing is skipped
silently; `--ignore-prefix` drops native prefixes on purpose, e.g. a tracker not in `Sam3Model`, and reports them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from medsynapse.locking import make_tree_readable

_VB = r"^backbone\.vision_backbone\.trunk\.blocks\.(\d+)\."
_VL = r"vision_encoder.backbone.layers.\1."
_TB = r"^backbone\.language_backbone\.encoder\.transformer\.resblocks\.(\d+)\."
_TL = r"text_encoder.text_model.encoder.layers.\1."
_GE, _GL = r"^geometry_encoder\.encode\.(\d+)\.", r"geometry_encoder.layers.\1."
_EE, _EL = r"^transformer\.encoder\.layers\.(\d+)\.", r"detr_encoder.layers.\1."
_DE, _DL = r"^transformer\.decoder\.layers\.(\d+)\.", r"detr_decoder.layers.\1."

# (pattern, replacement) applied in order to a native parameter name: prefixes first, then per-component renames;
# within a component the out_proj rule precedes the generic attention rule.
NATIVE_TO_HF: tuple[tuple[str, str], ...] = (
    (r"^module\.", ""),
    (r"^sam3_model\.", ""),
    # vision ViT (the fused qkv is split by `hf_targets`)
    (_VB + r"attn\.qkv\.", _VL + "attention.qkv."),
    (_VB + r"attn\.proj\.", _VL + "attention.o_proj."),
    (_VB + r"mlp\.(fc[12])\.", _VL + r"mlp.\2."),
    # text encoder (CLIP-style, nn.MultiheadAttention)
    (_TB + r"attn\.", _TL + "self_attn."),
    (_TB + r"mlp\.c_fc\.", _TL + "mlp.fc1."),
    (_TB + r"mlp\.c_proj\.", _TL + "mlp.fc2."),
    (r"^backbone\.language_backbone\.resizer\.", "text_projection."),
    # geometry encoder
    (_GE + r"cross_attn_image\.out_proj\.", _GL + "cross_attn.o_proj."),
    (_GE + r"cross_attn_image\.", _GL + "cross_attn."),
    (_GE + r"self_attn\.out_proj\.", _GL + "self_attn.o_proj."),
    (_GE + r"self_attn\.", _GL + "self_attn."),
    (_GE + r"linear([12])\.", _GL + r"mlp.fc\2."),
    # DETR encoder
    (_EE + r"cross_attn_image\.out_proj\.", _EL + "cross_attn.o_proj."),
    (_EE + r"cross_attn_image\.", _EL + "cross_attn."),
    (_EE + r"self_attn\.out_proj\.", _EL + "self_attn.o_proj."),
    (_EE + r"self_attn\.", _EL + "self_attn."),
    (_EE + r"cross_attn\.out_proj\.", _EL + "cross_attn.o_proj."),
    (_EE + r"cross_attn\.", _EL + "cross_attn."),
    (_EE + r"linear([12])\.", _EL + r"mlp.fc\2."),
    # DETR decoder
    (_DE + r"self_attn\.out_proj\.", _DL + "self_attn.o_proj."),
    (_DE + r"self_attn\.", _DL + "self_attn."),
    (_DE + r"ca_text\.out_proj\.", _DL + "text_cross_attn.o_proj."),
    (_DE + r"ca_text\.", _DL + "text_cross_attn."),
    (_DE + r"cross_attn\.out_proj\.", _DL + "vision_cross_attn.o_proj."),
    (_DE + r"cross_attn\.", _DL + "vision_cross_attn."),
    (_DE + r"linear([12])\.", _DL + r"mlp.fc\2."),
    # dot-product scoring and mask decoder
    (r"^dot_prod_scoring\.prompt_proj\.", "dot_product_scoring.text_proj."),
    (r"^dot_prod_scoring\.hs_proj\.", "dot_product_scoring.query_proj."),
    (r"^segmentation_head\.cross_attend_prompt\.out_proj\.", "mask_decoder.prompt_cross_attn.o_proj."),
    (r"^segmentation_head\.cross_attend_prompt\.", "mask_decoder.prompt_cross_attn."),
)
_RULES = tuple((re.compile(pattern), replacement) for pattern, replacement in NATIVE_TO_HF)
# module path, optional MedSAM3 `.lora` holder, A/B, optional PEFT `[.default].weight`
_LORA_KEY = re.compile(r"^(?P<module>.+?)(?P<holder>\.lora)?\.lora_(?P<part>[AB])(?P<peft>(?:\.default)?\.weight)?$")
_MHA_CHILD = re.compile(r"^(?P<parent>.+)\.(?P<proj>[qkv])_proj$")
MERGE_RECORD = "medsam3_merge.json"


class LoraMappingError(ValueError):
    """A LoRA key that cannot be merged (unknown form, no partner, no matching Sam3Model weight, wrong shape)."""


@dataclass
class LoraPair:
    module: str  # native module path, `module.` prefix dropped
    keys: tuple[str, str]  # the file's A and B keys, for error messages
    a: torch.Tensor
    b: torch.Tensor
    peft: bool  # PEFT layout: A (r, in), B (out, r); else MedSAM3: A (in, r), B (r, out)

    @property
    def rank(self) -> int:
        return self.a.shape[0] if self.peft else self.a.shape[1]

    def delta(self, alpha: float) -> torch.Tensor:
        """(alpha / r) * the low-rank update in the Linear weight's (out, in) layout."""
        a, b = self.a.float(), self.b.float()
        update = b @ a if self.peft else (a @ b).T
        return (alpha / self.rank) * update


@dataclass
class MergeReport:
    lora_keys: int
    lora_modules: int
    updated_parameters: int
    alpha: float
    rank: int
    ignored_keys: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"merged {self.lora_modules} LoRA modules ({self.lora_keys} keys, rank {self.rank},"
                f" alpha {self.alpha:g}, scale {self.alpha / self.rank:g}) into {self.updated_parameters}"
                f" Sam3Model weights;"
                f" ignored {len(self.ignored_keys)} keys by prefix")


def native_to_hf(name: str) -> str:
    """Native sam3 parameter name -> transformers Sam3Model name (unchanged when no rule applies)."""
    for pattern, replacement in _RULES:
        name = pattern.sub(replacement, name, count=1)
    return name


def hf_targets(module: str) -> list[tuple[str, int | None]]:
    """Sam3Model weights a LoRA on native Linear `module` updates, each with its third of the rows (None = all).

    `q_proj`/`k_proj`/`v_proj` are MedSAM3's split of a native `in_proj_weight`, mapped through that name; the ViT's
    fused `qkv` becomes transformers' three projections.
    """
    child = _MHA_CHILD.match(module)
    if child:
        name = native_to_hf(f"{child['parent']}.in_proj_weight")
        return [(re.sub(r"in_proj_weight$", f"{child['proj']}_proj.weight", name), None)]
    name = native_to_hf(f"{module}.weight")
    if ".attention.qkv." in name:
        return [(name.replace(".qkv.", f".{p}_proj."), i) for i, p in enumerate("qkv")]
    return [(name, None)]


def read_lora(path: str | Path) -> dict[str, torch.Tensor]:
    state = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    for wrapper in ("lora_state_dict", "state_dict", "model"):
        if isinstance(state, dict) and set(state) == {wrapper}:
            state = state[wrapper]
    if not isinstance(state, dict):
        raise LoraMappingError(f"{path}: expected a LoRA state dict, got {type(state).__name__}")
    return state


def pair_lora(state: Mapping[str, object], ignore_prefixes: Sequence[str] = ()) -> tuple[list[LoraPair], list[str]]:
    """Group A/B keys by module; every key must be a tensor of a complete pair or ignored by prefix."""
    parts: dict[tuple[str, bool], dict[str, tuple[str, torch.Tensor]]] = {}
    ignored = []
    for key, value in state.items():
        module_key = key.removeprefix("module.")
        if any(module_key.startswith(prefix) for prefix in ignore_prefixes):
            ignored.append(key)
            continue
        match = _LORA_KEY.match(module_key)
        if match is None or not isinstance(value, torch.Tensor) or value.ndim != 2:
            raise LoraMappingError(f"LoRA key {key!r} is not a 2-D `<module>.lora.lora_A/B` or "
                                   "`<module>.lora_A/B.weight` tensor; refusing to guess")
        group = parts.setdefault((match["module"], bool(match["peft"])), {})
        group[match["part"]] = (key, value)
    pairs = []
    for (module, peft), group in parts.items():
        if set(group) != {"A", "B"}:
            missing = "B" if "A" in group else "A"
            raise LoraMappingError(f"LoRA key {next(iter(group.values()))[0]!r} has no lora_{missing} partner")
        (key_a, a), (key_b, b) = group["A"], group["B"]
        pairs.append(LoraPair(module, (key_a, key_b), a, b, peft))
    return pairs, ignored


def weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape from the safetensors headers (no tensor is read)."""
    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    if not shapes:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    return shapes


def plan_updates(pairs: list[LoraPair], shapes: dict[str, tuple[int, ...]], alpha: float,
                 rank: int | None) -> dict[str, torch.Tensor]:
    """Sam3Model weight name -> the update to add; refuses any key whose target is missing or mis-shaped."""
    updates: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for pair in pairs:
        if rank is not None and pair.rank != rank:
            raise LoraMappingError(f"LoRA key {pair.keys[0]!r} has rank {pair.rank}, expected {rank}")
        delta = pair.delta(alpha)
        targets = hf_targets(pair.module)
        chunks = delta.chunk(3, dim=0) if targets[0][1] is not None else (delta,)
        for name, third in targets:
            piece = chunks[third or 0]
            if name not in shapes:
                raise LoraMappingError(f"LoRA key {pair.keys[0]!r} (native module {pair.module!r}) maps to {name!r}, "
                                       "which the base Sam3Model folder does not have")
            if tuple(piece.shape) != shapes[name]:
                raise LoraMappingError(f"LoRA key {pair.keys[0]!r}: update {tuple(piece.shape)} does not fit "
                                       f"{name!r} {shapes[name]}")
            if name in updates:
                raise LoraMappingError(f"LoRA keys {sources[name]!r} and {pair.keys[0]!r} both map to {name!r}")
            updates[name], sources[name] = piece, pair.keys[0]
    return updates


def _write_folder(base: Path, target: Path, updates: dict[str, torch.Tensor]) -> None:
    """Copy `base` into `target`, adding each update to its weight (in float32, stored in the weight's dtype)."""
    for path in sorted(base.iterdir()):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata()
            tensors = load_file(str(path))
            for name in tensors.keys() & updates.keys():
                tensors[name] = (tensors[name].float() + updates[name]).to(tensors[name].dtype)
            save_file(tensors, str(target / path.name), metadata=metadata)
        elif path.is_dir():
            shutil.copytree(path, target / path.name)
        else:
            shutil.copy2(path, target / path.name)


def merge_medsam3_lora(base: str | Path, lora: str | Path, out: str | Path, alpha: float = 32.0,
                       rank: int | None = 8, ignore_prefixes: Sequence[str] = ()) -> MergeReport:
    """Write `out`: the base Sam3Model folder with the LoRA merged; validated in full before anything is written."""
    base, lora, out = Path(base).expanduser(), Path(lora).expanduser(), Path(out).expanduser()
    config = json.loads((base / "config.json").read_text())
    if config.get("model_type") != "sam3":
        raise ValueError(f"{base}: not a transformers Sam3Model folder (model_type {config.get('model_type')!r})")
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new output folder")
    state = read_lora(lora)
    pairs, ignored = pair_lora(state, ignore_prefixes)
    if not pairs:
        raise LoraMappingError(f"{lora}: no LoRA pairs to merge")
    updates = plan_updates(pairs, weight_shapes(base), alpha, rank)
    report = MergeReport(len(state), len(pairs), len(updates), alpha, pairs[0].rank if rank is None else rank,
                         ignored)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _write_folder(base, tmp, updates)
        record = {**asdict(report), "base": base.name, "lora": lora.name,
                  "lora_sha256": hashlib.sha256(lora.read_bytes()).hexdigest()}
        (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        make_tree_readable(tmp)  # mkdtemp's 0700 and safetensors' 0600 -> the umask's modes
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medsynapse.model.encoders.medsam3_convert",
                                     description="Merge a MedSAM3 LoRA into a transformers Sam3Model folder.")
    parser.add_argument("--base", required=True, help="transformers Sam3Model folder (base SAM 3 weights)")
    parser.add_argument("--lora", required=True, help="MedSAM3 LoRA state dict (best_lora_weights.pt)")
    parser.add_argument("--out", required=True, help="new output folder (must not exist)")
    parser.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (MedSAM3: 32)")
    parser.add_argument("--rank", type=int, default=8,
                        help="expected LoRA rank (MedSAM3: 8); 0 = take it from the file")
    parser.add_argument("--ignore-prefix", action="append", default=[],
                        help="native key prefix to leave out on purpose (repeatable; counted in the report)")
    args = parser.parse_args(argv)
    try:
        report = merge_medsam3_lora(args.base, args.lora, args.out, args.alpha, args.rank or None, args.ignore_prefix)
    except (ValueError, OSError) as exc:  # LoraMappingError is a ValueError; a missing or existing folder an OSError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
