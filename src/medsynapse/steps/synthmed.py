"""SynthMed's preparation steps, shared by every training seed of the demo and of a SynthMed study: `data` (the
synthetic split) -> `build_vlm` (a tiny Qwen3-VL built offline) -> `base_prep` (its preparation, recipes/prepare_base)
-> `encoder` (the prior encoder trained on the masks, then frozen). Each step is cached in the demo cache under a
content key of everything that shapes it, code versions included, and appears only when it finished (`_cached`).

The run file's `synthmed` section (DemoConfig) holds their settings; `fill_shared` writes the cached folders into
the run file's `model.vlm`, `model.encoder` and `data.stage1_file`, which the shipped SynthMed run files leave empty.
Used by the drivers (`medsynapse demo`, `medsynapse study`); imports none of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medsynapse.config import ConfigError, from_dict
from medsynapse.data.schema import Sample, read_samples
from medsynapse.data.synthmed import SYNTHMED_VERSION, corpus_lines, generate_split
from medsynapse.model.tiny import TinyVLMSpec, build_tiny_vlm
from medsynapse.recipes.prepare_base import BASE_VERSION, BasePrepConfig, prepare_base
from medsynapse.recipes.train_encoder import EncoderTrainConfig, train_encoder
from medsynapse.runconfig import RunConfig, with_seed

ENCODER_VERSION = 2  # bump when the tiny encoder's architecture or training changes


@dataclass
class DemoConfig:
    """The run file's `synthmed` section: everything but Stages I-III, whose settings are the run file's own."""

    cache_dir: str = ""  # default: $MEDSYNAPSE_CACHE or ~/.cache/medsynapse
    seed: int = 0  # training seed of every stage and control (initialisation, data order, rollouts)
    seeds: list[int] = field(default_factory=list)  # several: one pipeline per seed under OUTPUT/seed_K + summary
    data_seed: int = 0  # SynthMed, the base VLM and the prior encoder: shared by every seed
    image_size: int = 64
    vlm_resolution: int = 128  # the tiny VLM sees each scan at 128 px: 4x4 merged visual tokens (A_psi: 16 slots)
    train_images: int = 1000
    test_images: int = 150
    base_steps: int = 500
    base_vision_steps: int = 600  # vision pre-training of the tiny tower (lesion-coverage head), recipes/prepare_base
    base_grounding_weight: float = 1.0  # that head's loss kept as an auxiliary term while the language is trained
    encoder_steps: int = 250
    # The rows of configs/study-demo.yaml that run (study.demo_study): the controls without memory (its `baseline`
    # rows: SFT = Stage I's data, steps and batch with a LoRA instead of memory; GRPO-only = Stage II's settings
    # without memory or causal term) and the ablations (its rows with a `set`: three Stage II rewards from the same
    # Stage I model, the paper's JSD-only IMT from the same Stage II model).
    controls: bool = True
    ablations: bool = False
    diagnostics: bool = True  # memory-reliance report per stage, leak and readability probes
    efficiency_samples: int = 60  # timed samples per model (after 3 warm-up; medians are noisy below ~50); 0: not timed
    eval_batch_size: int = 64
    threads: int = 0  # 0 = torch default


def _cache_root(config: DemoConfig) -> Path:
    """--cache-dir, else the cache saved model folders search for their bases (model/bases.py)."""
    from medsynapse.model.bases import cache_root

    return Path(config.cache_dir) if config.cache_dir else cache_root()


def _key(*parts: object) -> str:
    """Content key of a cached artefact: everything that shapes it, code versions included."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _cached(folder: Path, build) -> Path:
    """Run `build(tmp)` once; the folder only appears (atomically renamed) when the build finished."""
    if (folder / ".done").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / ".done").write_text("ok")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


@dataclass
class Shared:
    """What does not depend on the training seed: data, base VLM, prior encoder and the evaluation split."""

    data: Path
    vlm_base: Path
    encoder: Path
    encoder_info: dict
    test: list[Sample]
    train_n: int
    timing: dict[str, float]

    @property
    def train_file(self) -> str:
        return str(self.data / "train.jsonl")


def stopwatch(timing: dict[str, float]):
    def timed(name, fn):
        start = time.perf_counter()
        value = fn()
        timing[name] = round(time.perf_counter() - start, 2)
        return value
    return timed


def shared_folders(config: DemoConfig) -> dict[str, Path]:
    """Where the cache keeps (or will keep) the data, the tiny VLM, the prepared base VLM and the prior encoder: the
    content keys of what shapes each, computed without building anything (`medsynapse study --plan` uses them)."""
    cache, seed = _cache_root(config), config.data_seed
    spec = TinyVLMSpec(image_size=config.image_size, vlm_resolution=config.vlm_resolution, seed=seed)
    data_key = _key(SYNTHMED_VERSION, seed, config.image_size, config.train_images, config.test_images)
    vlm_key = _key(data_key, asdict(spec))
    base_key = _key(vlm_key, config.base_steps, BASE_VERSION, config.base_vision_steps, config.base_grounding_weight)
    return {"data": cache / f"data-{data_key}", "vlm_init": cache / f"vlm_init-{vlm_key}",
            "vlm_base": cache / f"vlm_base-{base_key}",
            "encoder": cache / f"encoder-{_key(data_key, ENCODER_VERSION, config.encoder_steps)}"}


def planned_shared(config: DemoConfig) -> Shared:
    """The Shared folders `prepare_shared` would give, without building them (no test split, no timings)."""
    folders = shared_folders(config)
    return Shared(folders["data"], folders["vlm_base"], folders["encoder"], {}, [], 0, {})


def prepare_shared(config: DemoConfig) -> Shared:
    """Data, tiny VLM, base-VLM preparation and the prior encoder, each cached under a key of what shapes it."""
    timing: dict[str, float] = {}
    timed = stopwatch(timing)
    seed = config.data_seed

    def make_data(tmp: Path) -> None:
        generate_split(tmp, "train", config.train_images, seed, config.image_size)
        generate_split(tmp, "test", config.test_images, seed, config.image_size)

    spec = TinyVLMSpec(image_size=config.image_size, vlm_resolution=config.vlm_resolution, seed=seed)
    folders = shared_folders(config)
    data = timed("data", lambda: _cached(folders["data"], make_data))
    train_file = str(data / "train.jsonl")
    vlm_init = timed("build_vlm", lambda: _cached(folders["vlm_init"],
                                                  lambda tmp: build_tiny_vlm(tmp, corpus_lines(), spec)))

    def make_base(tmp: Path) -> None:
        prepare_base(BasePrepConfig(vlm=str(vlm_init), train_file=train_file, output_dir=str(tmp),
                                    steps=config.base_steps, seed=seed,
                                    vision_steps=config.base_vision_steps,
                                    grounding_weight=config.base_grounding_weight))

    vlm_base = timed("base_prep", lambda: _cached(folders["vlm_base"], make_base))

    def make_encoder(tmp: Path) -> None:
        _, info = train_encoder(EncoderTrainConfig(train_file=train_file, output_dir=str(tmp),
                                                   image_size=config.image_size, steps=config.encoder_steps,
                                                   seed=seed))
        (tmp / "train_metrics.json").write_text(json.dumps(info))

    encoder = timed("encoder", lambda: _cached(folders["encoder"], make_encoder))
    test = [s for s in read_samples(data / "test.jsonl") if s.family == "lesion" and s.answer_type != "caption"]
    train_n = len([s for s in read_samples(data / "train.jsonl") if s.answer_type != "caption"])
    return Shared(data, vlm_base, encoder, json.loads((encoder / "train_metrics.json").read_text()), test, train_n,
                  timing)


def demo_settings(run: RunConfig) -> DemoConfig:
    """The run file's `synthmed` section as a DemoConfig (strict: an unknown key names `FILE.synthmed.key`)."""
    for key, value in (("model.vlm", run.model.vlm), ("model.encoder", run.model.encoder),
                       ("data.stage1_file", run.data.stage1_file), ("data.stage2_file", run.data.stage2_file)):
        if value:
            raise ConfigError(f"{run.source}.{key}: the demo builds and fills it in (SynthMed); leave it empty")
    if run.data.stage1_corpora or run.data.stage2_corpora:
        raise ConfigError(f"{run.source}.data: the demo trains on SynthMed; corpora by name are for `pipeline`")
    return from_dict(DemoConfig, dict(run.synthmed), f"{run.source}.synthmed")


def check_settings(run: RunConfig, config: DemoConfig) -> None:
    """Every value the demo will train with, before anything is built: the run file's stages and baselines
    (values.check_run, with the memory bound) and its SynthMed numbers (the rows' own: study.check_rows)."""
    from medsynapse.values import check_run, check_value

    check_run(run)
    where = f"{run.source}.synthmed"
    for name in ("image_size", "vlm_resolution", "train_images", "test_images", "base_steps", "base_vision_steps",
                 "encoder_steps", "efficiency_samples", "eval_batch_size"):
        low = 0 if name in ("vlm_resolution", "efficiency_samples") else 1
        check_value(name, getattr(config, name), f"{where}.{name}", ("int", low, None, False, False))
    check_value("base_grounding_weight", config.base_grounding_weight, f"{where}.base_grounding_weight")


def fill_shared(run: RunConfig, shared: Shared) -> RunConfig:
    """The run file with the SynthMed folders filled in: the cached base VLM, prior encoder and training file."""
    model = dataclasses.replace(run.model, vlm=str(shared.vlm_base), encoder=str(shared.encoder))
    return dataclasses.replace(run, model=model, data=dataclasses.replace(run.data, stage1_file=shared.train_file))


def seed_run(run: RunConfig, shared: Shared, seed: int, out: Path) -> RunConfig:
    """The run file with the SynthMed folders filled in, every stage at training seed `seed`, output `out`."""
    return dataclasses.replace(with_seed(fill_shared(run, shared), seed), output=str(out))


def shared_key(config: DemoConfig) -> str:
    """Which shared folders a SynthMed run uses: rows of a study whose `synthmed` settings differ only in what no
    folder depends on (seeds, threads, controls, ...) share one set."""
    return _key(*(str(folder) for folder in shared_folders(config).values()))


def token_readability(shared: Shared, seed: int = 0) -> dict:
    """How well lesion presence is read linearly from the prepared base VLM's merged visual tokens (what the
    encoder-free student A_psi reads): the visibility of the lesion evidence to the VLM itself, measured per image
    (eval/diagnostics.linear_probe: train images -> test images, with its Wilson interval and the majority rate).
    Cached beside the base VLM (`readability-KEY.json`, KEY the base VLM's folder key)."""
    path = shared.vlm_base.with_name(shared.vlm_base.name.replace("vlm_base-", "readability-") + f"-s{seed}.json")
    if path.is_file():
        return json.loads(path.read_text())
    from medsynapse.eval.diagnostics import readability_probes
    from medsynapse.locking import write_text_atomic
    from medsynapse.model.medsynapse import MedSynapseV

    train = [s for s in read_samples(shared.train_file) if s.family == "lesion"]
    test = [s for s in read_samples(shared.data / "test.jsonl") if s.family == "lesion"]
    model = MedSynapseV.from_pretrained(shared.vlm_base)
    probe = readability_probes(model, train, test, labels=("presence",), seed=seed, kinds=("vlm_visual_tokens",),
                               train_source=shared.train_file, test_source=str(shared.data / "test.jsonl"))
    result = {k: v for k, v in probe["vlm_visual_tokens"].items() if k != "by_label"}
    result["vlm_base"] = str(shared.vlm_base)
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    return result
