"""`medsynapse serve --engine vllm`: the same OpenAI server with vLLM generating (runs under `.venv-vllm` only).

Greedy answers equal the transformers server's (its model answering each request alone), the log-probabilities of a
reply equal the training model's scores of it, sampled choices and stop strings go through the same `Choice` code,
and a stream joins to the same text. The engine runs in this process (quick to start)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch
from conftest import lora_teacher

pytest.importorskip("vllm", reason="vllm is not importable in this environment: the vLLM tests run under .venv-vllm "
                    "(make vllm-env && make test-vllm)")

from medsynapse.answers import format_prompt  # noqa: E402
from medsynapse.data.images import load_image  # noqa: E402
from medsynapse.data.schema import read_samples  # noqa: E402
from medsynapse.model.medsynapse import MedSynapseV  # noqa: E402
from medsynapse.model.vlm import completion_logprobs, completion_mask, vision_features  # noqa: E402
from medsynapse.serve import ServeSettings, create_app  # noqa: E402

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def teacher(tiny_env, tmp_path_factory) -> Path:
    return lora_teacher(tiny_env, tmp_path_factory.mktemp("serve_vllm") / "teacher")


@pytest.fixture(scope="module")
def client(teacher, monkeypatch_module):
    from fastapi.testclient import TestClient

    monkeypatch_module.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with TestClient(create_app(str(teacher), ServeSettings(engine="vllm", max_new_tokens=8,
                                                           vllm_context=1024))) as served:
        yield served


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def asks(tiny_env) -> list[tuple[Path, str]]:
    return [(Path(s.images[0]), s.question) for s in read_samples(tiny_env.test_file)[:4]]


def _body(path: Path, question: str, **params) -> dict:
    uri = f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"
    return {"max_tokens": 8, "temperature": 0, **params,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                      {"type": "text", "text": question}]}]}


def test_greedy_answers_equal_the_models_own(client, teacher, asks):
    model = MedSynapseV.from_pretrained(teacher, merge_adapter=True)
    for path, question in asks:
        reply = client.post(CHAT, json=_body(path, question))
        assert reply.status_code == 200, reply.text
        expected = model.answer([load_image(str(path))], [format_prompt(question, model.answer_format)], 8)[0]
        assert reply.json()["choices"][0]["message"]["content"] == expected


def test_logprobs_are_the_models_scores_of_the_reply_and_top_alternatives_are_ordered(client, teacher, asks):
    model = MedSynapseV.from_pretrained(teacher, merge_adapter=True)
    path, question = asks[0]
    reply = client.post(CHAT, json=_body(path, question, logprobs=True, top_logprobs=3)).json()
    content = reply["choices"][0]["logprobs"]["content"]
    image = load_image(str(path))
    item = model.prompts.encode([image], format_prompt(question, model.answer_format))
    tokens = model.generate_encoded([item], [image], 8)  # greedy: the reply's tokens (test above)
    mask = completion_mask(tokens, model.prompts.eos_id)
    batch = model.prompts.collate([item], with_answers=False)
    features = vision_features(model.vlm, batch)
    with torch.no_grad():
        expected = completion_logprobs(model.vlm, batch, model.memory_for(batch, [image], features), tokens, mask,
                                       model.latent_id, features)[0, :len(content)]
    assert len(content) == int(mask.sum())
    torch.testing.assert_close(torch.tensor([entry["logprob"] for entry in content]), expected, atol=1e-4, rtol=0)
    for entry in content:
        tops = [alternative["logprob"] for alternative in entry["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] >= entry["logprob"] - 1e-6


def test_sampled_choices_stops_and_streams_go_through_the_same_choices(client, asks):
    path, question = asks[1]
    sampled = client.post(CHAT, json=_body(path, question, temperature=1.0, n=3, seed=7)).json()
    assert [c["index"] for c in sampled["choices"]] == [0, 1, 2]
    again = client.post(CHAT, json=_body(path, question, temperature=1.0, n=3, seed=7)).json()
    assert [c["message"]["content"] for c in again["choices"]] == [c["message"]["content"] for c in sampled["choices"]]
    plain = client.post(CHAT, json=_body(path, question)).json()["choices"][0]["message"]["content"]
    if len(plain) > 2:
        stop = plain[1:3]
        cut = client.post(CHAT, json=_body(path, question, stop=[stop])).json()["choices"][0]
        assert cut["message"]["content"] == plain[:plain.index(stop)].strip() and cut["finish_reason"] == "stop"
    with client.stream("POST", CHAT, json=_body(path, question, stream=True)) as streamed:
        events = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == plain
