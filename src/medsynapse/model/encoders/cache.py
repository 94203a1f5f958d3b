"""On-disk cache of frozen prior-encoder outputs (tokens + region masks), keyed by image content and encoder.

Layout: `<root>/<encoder fingerprint>/index.json` + `shard_NNNNN.safetensors`. The fingerprint hashes the encoder
folder's json files (config, tokenizer, settings such as SAM 3 prompts), its weight files (name, size, first and last
MiB) and the settings the encoder resolves from code defaults (`encoder_settings`), so a changed encoder never reads
stale features. Images are keyed by the SHA-256 of their file bytes, so renamed copies hit and edited files miss.
Shards are written to a temporary name and renamed; the index is rewritten atomically after each shard.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from medsynapse.model.encoders import encoder_settings
from medsynapse.model.encoders.base import PriorOutput

_MIB = 2**20


def encoder_fingerprint(folder: str | Path) -> str:
    folder = Path(folder).expanduser()
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix == ".json":
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        elif path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with path.open("rb") as handle:
                digest.update(handle.read(_MIB))
                handle.seek(max(0, size - _MIB))
                digest.update(handle.read(_MIB))
    settings = encoder_settings(folder)
    if settings:  # only encoders with code-level defaults: the fingerprints of other folders stay as they were
        digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def image_key(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class PriorCache:
    def __init__(self, root: str | Path, encoder_folder: str | Path):
        self.dir = Path(root).expanduser() / encoder_fingerprint(encoder_folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        index_path = self.dir / "index.json"
        self.index: dict[str, str] = json.loads(index_path.read_text()) if index_path.is_file() else {}
        self._loaded: dict[str, dict[str, torch.Tensor]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        shard = self.index[key]
        if shard not in self._loaded:
            self._loaded[shard] = load_file(str(self.dir / shard))
        tensors = self._loaded[shard]
        grid = tensors[f"{key}.grid"]
        return tensors[f"{key}.tokens"], tensors[f"{key}.region"].bool(), (int(grid[0]), int(grid[1]))

    def put(self, keys: list[str], prior: PriorOutput) -> None:
        """Write one shard holding these images' features, then the index."""
        shard = f"shard_{len(set(self.index.values())):05d}.safetensors"
        grid = torch.tensor(prior.grid)
        tensors = {}
        for i, key in enumerate(keys):
            tensors[f"{key}.tokens"] = prior.tokens[i].detach().cpu().contiguous().clone()  # own storage: safetensors
            tensors[f"{key}.region"] = prior.region_mask[i].cpu().to(torch.uint8).clone()  # refuses shared views
            tensors[f"{key}.grid"] = grid.clone()
        tmp = self.dir / (shard + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(self.dir / shard)
        self.index.update({key: shard for key in keys})
        index_tmp = self.dir / "index.json.tmp"
        index_tmp.write_text(json.dumps(self.index))
        index_tmp.replace(self.dir / "index.json")
