"""vLLM generation equals the transformers path, token for token and log-probability for log-probability.

Runs under `.venv-vllm` only (`make test-vllm`); in the main environment the whole module is one skip whose reason
says so. One in-process vLLM engine serves every model here: a Stage-II-like teacher (P_phi + prior encoder, a
non-zero LoRA merged), the encoder-free student (A_psi) and the plain VLM all share that VLM's weights, and the memory
is what each MedSynapseV computes. Reference: `MedSynapseV.generate_encoded` / `answer` (greedy tokens) and
`completion_logprobs` (per-token log-probabilities of the same sequences), both in float32.
"""

from __future__ import annotations

import pytest
import torch
from conftest import lora_teacher

pytest.importorskip("vllm", reason="vllm is not importable in this environment: the vLLM tests run under .venv-vllm "
                    "(make vllm-env && make test-vllm)")

from medsynapse.data.images import load_image  # noqa: E402
from medsynapse.data.schema import read_samples  # noqa: E402
from medsynapse.data.sources import PAPER_BENCHMARKS  # noqa: E402
from medsynapse.data.sources.fixtures import write_fixtures  # noqa: E402
from medsynapse.engines.vllm_engine import VLLMEngine  # noqa: E402
from medsynapse.eval.runner import PREDICTIONS, EvalSettings, evaluate_benchmarks, read_predictions  # noqa: E402
from medsynapse.model.medsynapse import MedSynapseV  # noqa: E402
from medsynapse.model.memory import AutonomousConfig, AutonomousMemoryModule  # noqa: E402
from medsynapse.model.vlm import completion_logprobs, completion_mask, core_vlm, vision_features  # noqa: E402

MAX_NEW = 10
LOGPROB_ATOL = 1e-4  # float32 on both sides; bf16 (vLLM's CPU default) is off by ~1e-3


@pytest.fixture(scope="module")
def teacher_folder(tiny_env, tmp_path_factory):
    """A teacher for up to 2 images per question with a non-zero LoRA, saved as Stage II saves it."""
    return lora_teacher(tiny_env, tmp_path_factory.mktemp("vllm_teacher"), max_images=2)


@pytest.fixture(scope="module")
def models(teacher_folder) -> dict[str, MedSynapseV]:
    teacher = MedSynapseV.from_pretrained(teacher_folder, merge_adapter=True)  # as evaluation loads it
    hidden = teacher.vlm.config.text_config.hidden_size
    torch.manual_seed(1)
    autonomous = AutonomousMemoryModule(AutonomousConfig(hidden_size=hidden, n_memory=4, pooling="attention",
                                                         attention_dim=32, embed_rms=teacher.sampler.config.embed_rms))
    student = MedSynapseV(teacher.vlm, teacher.processor, autonomous=autonomous).eval()
    plain = MedSynapseV(teacher.vlm, teacher.processor).eval()
    return {"plain": plain, "teacher": teacher, "student": student}


@pytest.fixture(scope="module")
def engine(models, tmp_path_factory) -> VLLMEngine:
    return VLLMEngine(models["teacher"], tmp_path_factory.mktemp("vllm_export"), max_images=2, max_model_len=1024,
                      in_process=True)


@pytest.fixture(scope="module")
def questions(tiny_env) -> tuple[list[list], list[str]]:
    samples = read_samples(tiny_env.test_file) + read_samples(tiny_env.train_file)[:4]
    return [[load_image(s.images[0], s)] for s in samples], [s.question for s in samples]


def hf_reference(model: MedSynapseV, images: list[list], questions: list[str], memory_transform=None):
    """Greedy tokens (B, T), their completion mask and per-token log-probabilities from the transformers path."""
    items = [model.prompts.encode(imgs, q) for imgs, q in zip(images, questions)]
    flat = [img for imgs in images for img in imgs]
    tokens = model.generate_encoded(items, flat, MAX_NEW, memory_transform=memory_transform)
    mask = completion_mask(tokens, model.prompts.eos_id)
    batch = model.prompts.collate(items, with_answers=False)
    features = vision_features(model.vlm, batch)
    memory = model.memory_for(batch, flat, features)
    if memory_transform is not None:
        memory = memory_transform(memory)
    with torch.no_grad():
        logp = completion_logprobs(model.vlm, batch, memory, tokens, mask, model.latent_id, features)
    return tokens, mask, logp


def assert_same_as_hf(model, engine, images, questions, memory_transform=None) -> None:
    tokens, mask, logp = hf_reference(model, images, questions, memory_transform)
    outputs = engine.with_model(model).generate(images, questions, MAX_NEW, logprobs=True,
                                                memory_transform=memory_transform)
    for row, out in enumerate(outputs):
        length = int(mask[row].sum())
        assert out[0].token_ids == tokens[row, :length].tolist(), f"question {row}"
        torch.testing.assert_close(torch.tensor(out[0].logprobs), logp[row, :length], atol=LOGPROB_ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["plain", "teacher", "student"])
def test_greedy_tokens_and_logprobs_equal_transformers(kind, models, engine, questions):
    assert_same_as_hf(models[kind], engine, *questions)


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_answers_equal_medsynapse_answer(kind, models, engine, questions):
    images, texts = questions
    flat = [imgs[0] for imgs in images]
    assert engine.with_model(models[kind]).answer(flat, texts, MAX_NEW) == models[kind].answer(flat, texts, MAX_NEW)


def test_multi_image_teacher_equal_transformers(models, engine, questions):
    images, texts = questions
    pairs = [[images[i][0], images[(i + 1) % len(images)][0]] for i in range(4)]
    assert_same_as_hf(models["teacher"], engine, pairs, texts[:4])


def test_memory_reaches_the_model_and_transforms_apply(models, engine, questions):
    """The memory changes what vLLM computes (zeroed memory: other log-probabilities), and a transformed memory
    (the diagnostics' zeroing) is the same on both paths."""
    images, texts = questions
    teacher = engine.with_model(models["teacher"])
    with_memory = teacher.generate(images[:4], texts[:4], MAX_NEW, logprobs=True)
    zeroed = teacher.generate(images[:4], texts[:4], MAX_NEW, logprobs=True, memory_transform=torch.zeros_like)
    assert any(a[0].logprobs[0] != pytest.approx(b[0].logprobs[0], abs=1e-3) for a, b in zip(with_memory, zeroed))
    assert_same_as_hf(models["teacher"], engine, images[:4], texts[:4], memory_transform=torch.zeros_like)


def test_sampled_rollouts_score_as_transformers_scores_them(models, engine, questions):
    """Stage II's G=4 sampled continuations at temperature 1: vLLM's log-probability of each sampled token equals
    `completion_logprobs` of the same sequence (what the GRPO loss would recompute)."""
    images, texts = questions
    model = models["teacher"]
    outputs = engine.with_model(model).generate(images[:2], texts[:2], MAX_NEW, n=4, temperature=1.0, seed=0,
                                                logprobs=True)
    assert [len(out) for out in outputs] == [4, 4]
    items = [model.prompts.encode(imgs, q) for imgs, q in zip(images[:2], texts[:2])]
    for row, rollouts in enumerate(outputs):
        batch = model.prompts.collate([items[row]] * 4, with_answers=False)
        features = vision_features(model.vlm, batch)
        memory = model.memory_for(batch, images[row] * 4, features)
        width = max(len(r.token_ids) for r in rollouts)
        tokens = torch.full((4, width), model.prompts.tokenizer.pad_token_id)
        mask = torch.zeros(4, width, dtype=torch.long)
        for g, rollout in enumerate(rollouts):
            tokens[g, :len(rollout.token_ids)] = torch.tensor(rollout.token_ids)
            mask[g, :len(rollout.token_ids)] = 1
        with torch.no_grad():
            logp = completion_logprobs(model.vlm, batch, memory, tokens, mask, model.latent_id, features)
        for g, rollout in enumerate(rollouts):
            torch.testing.assert_close(torch.tensor(rollout.logprobs), logp[g, :len(rollout.token_ids)],
                                       atol=LOGPROB_ATOL, rtol=0)


def test_generation_config_end_tokens_stop_both_paths(models, engine, questions):
    """transformers stops at every eos id of the generation config (Qwen3-VL-8B lists two); vLLM must stop there
    too, not only at the tokenizer's eos. Here the third greedy token is made an end token."""
    images, texts = questions
    model = models["plain"]
    plain = engine.with_model(model)
    free = plain.generate(images[:1], texts[:1], MAX_NEW)[0][0].token_ids
    config = core_vlm(model.vlm).generation_config
    saved = config.eos_token_id
    config.eos_token_id = [model.prompts.eos_id, free[2]]
    try:
        hf = model.generate_encoded([model.prompts.encode(images[0], texts[0])], images[0], MAX_NEW)[0].tolist()
        stopped = engine.with_model(model).generate(images[:1], texts[:1], MAX_NEW)[0][0].token_ids
    finally:
        config.eos_token_id = saved
    cut = free.index(free[2]) + 1
    assert stopped == free[:cut] == hf[:cut] and len(stopped) < len(free)


def test_latent_reasoning_baselines_are_refused(models, engine, questions):
    images, texts = questions
    teacher = models["teacher"]
    coconut = MedSynapseV(teacher.vlm, teacher.processor, latent={"method": "coconut", "thoughts": 2})
    with pytest.raises(ValueError, match="latent-reasoning baseline"):
        engine.with_model(coconut).generate(images[:1], texts[:1], MAX_NEW)


def test_eval_engine_vllm_gives_the_transformers_predictions_and_scores(teacher_folder, engine, tmp_path):
    """`medsynapse eval --engine vllm` on the seven fixture benchmarks: every raw answer, and so every score, equal
    to the transformers run's (questions over the teacher's 2 images are skipped alike by both)."""
    data_root = write_fixtures(tmp_path / "data")
    runs = {}
    for name in ("hf", "vllm"):
        settings = EvalSettings(batch_size=4, max_new_tokens=6, skip_bad=True, engine=name)
        metrics = evaluate_benchmarks(str(teacher_folder), PAPER_BENCHMARKS, data_root, tmp_path / name, settings)
        predictions = {b: read_predictions(tmp_path / name / b / PREDICTIONS) for b in PAPER_BENCHMARKS}
        runs[name] = ({b: {k: v for k, v in m.items() if k != "efficiency"} for b, m in metrics.items()},
                      {b: sorted((line["id"], line.get("raw"), line.get("correct")) for line in lines)
                       for b, lines in predictions.items()})
    assert sum(len(lines) for lines in runs["hf"][1].values()) > 10
    assert runs["vllm"][1] == runs["hf"][1]
    assert runs["vllm"][0] == runs["hf"][0]


def test_memories_for_some_questions_only_are_refused(models, engine, questions):
    images, texts = questions
    memory = engine.memories(images[:1], texts[:1])[0]
    with pytest.raises(ValueError, match="give a memory for every question or for none"):
        engine.generate(images[:2], texts[:2], MAX_NEW, memories=[memory, None])


def test_from_pretrained_passes_its_settings_to_vllm(teacher_folder, tmp_path):
    loaded = VLLMEngine.from_pretrained(teacher_folder, tmp_path / "export", max_images=2, max_model_len=512,
                                        in_process=True)
    assert loaded.llm.llm_engine.model_config.max_model_len == 512
    assert loaded.model.n_memory == 4
    loaded.close()
