"""`medsynapse serve` through the official `openai` client, against one real server process for the module (a tiny
fresh model): streaming joins to the whole answer and ends with [DONE]; `n` sampled choices are reproducible from
their seed and do not depend on the batch; `stop` cuts at the first stop string; `max_completion_tokens` bounds the
answer; `usage` and `logprobs` equal what the model and its tokenizer give directly; models are listed and
retrieved; every parameter the server does not serve is a 400 naming it, streamed or not; the bounds hold for
streams (a JSON error before the first byte, an error event after)."""

from __future__ import annotations

import base64
import io
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from PIL import Image
from serving import served

from medsynapse.answers import format_prompt
from medsynapse.data.images import load_image
from medsynapse.data.schema import read_samples
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.vlm import completion_mask, completion_outputs, vision_features
from medsynapse.serve import ServeSettings, create_app
from medsynapse.serve_choices import Choice, Vocabulary

pytestmark = pytest.mark.slow

MAX_NEW = 16  # the server's --max-new-tokens


@pytest.fixture(scope="module")
def folder(tiny_env, tmp_path_factory) -> Path:
    """A fresh tiny model with its prior encoder, saved as a servable folder."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("openai") / "tiny-medsynapse"
    MedSynapseV.build(str(tiny_env.vlm), str(tiny_env.encoder), n_memory=4, width=32, dtype="float32"
                      ).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model(folder) -> MedSynapseV:
    """The served model loaded here: the reference for token counts and log-probabilities."""
    return MedSynapseV.from_pretrained(folder, merge_adapter=True).eval()


@pytest.fixture(scope="module")
def base(folder, tmp_path_factory) -> str:
    log = tmp_path_factory.mktemp("openai-log") / "server.log"
    with served(folder, log, "--max-batch", "8", "--max-wait-ms", "250", "--max-new-tokens", str(MAX_NEW),
                "--max-body-mb", "1", "--timeout", "600") as url:
        yield url


@pytest.fixture(scope="module")
def client(base) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)  # a loaded CI box


@pytest.fixture(scope="module")
def asks(tiny_env, tmp_path_factory) -> list[tuple[Path, str]]:
    """(PNG file, question) for each test-split sample."""
    folder = tmp_path_factory.mktemp("openai-images")
    out = []
    for number, sample in enumerate(read_samples(tiny_env.test_file)):
        path = folder / f"{number}.png"
        Image.open(sample.images[0]).convert("RGB").save(path)
        out.append((path, sample.question))
    return out


def _messages(path: Path, question: str) -> list[dict]:
    uri = f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": question}]}]


def _ask(client: openai.OpenAI, folder: Path, ask: tuple[Path, str], **params):
    return client.chat.completions.create(model=folder.name, messages=_messages(*ask), **params)


def _streamed(client, folder, ask, **params) -> tuple[list, dict[int, str]]:
    """The chunks of a streamed answer, and each choice's content joined."""
    chunks = list(_ask(client, folder, ask, stream=True, **params))
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    return chunks, texts


def _raw_events(base: str, folder: Path, ask, **params) -> list[str]:
    """A streamed answer's `data:` lines, read without the client (which swallows [DONE])."""
    body = {"model": folder.name, "messages": _messages(*ask), "stream": True, **params}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        return [line[len("data: "):] for line in reply.iter_lines() if line.startswith("data: ")]


def test_a_stream_joins_to_the_whole_answer_and_ends_with_done(client, base, folder, asks):
    whole = _ask(client, folder, asks[0], max_tokens=MAX_NEW, temperature=0)
    text = whole.choices[0].message.content
    assert len(text) > 3, text  # an answer long enough for a join to show a lost or doubled piece
    chunks, texts = _streamed(client, folder, asks[0], max_tokens=MAX_NEW, temperature=0,
                              stream_options={"include_usage": True})
    assert texts == {0: text}
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1  # the text came in pieces, as it was generated
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # the usage chunk, last
    assert all(c.usage is None for c in chunks[:-1])
    events = _raw_events(base, folder, asks[0], max_tokens=MAX_NEW, temperature=0)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == text
    assert not any("usage" in json.loads(e) for e in events[:-1])  # no usage unless asked for


def test_n_sampled_choices_follow_their_seed_whatever_the_batch(client, base, folder, asks):
    params = {"max_tokens": MAX_NEW, "temperature": 1.0, "n": 3, "seed": 1234}

    def texts(reply) -> list[str]:
        return [choice.message.content for choice in reply.choices]

    first = _ask(client, folder, asks[1], **params)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len(set(texts(first))) == 3  # three different samples
    assert texts(_ask(client, folder, asks[1], **params)) == texts(first)  # the same seed, the same samples
    assert texts(_ask(client, folder, asks[1], **{**params, "seed": 99})) != texts(first)
    with ThreadPoolExecutor(6) as pool:  # the same request batched after others, sampled ones of its length first
        others = [pool.submit(_ask, client, folder, asks[k], max_tokens=MAX_NEW, **sampling)
                  for k, sampling in ((1, {"temperature": 1.0, "seed": 7}), (1, {"temperature": 1.0, "n": 2}),
                                      (0, {"temperature": 1.0}), (2, {"temperature": 0}), (3, {"temperature": 0.7}))]
        time.sleep(0.05)
        batched = pool.submit(_ask, client, folder, asks[1], **params)
        [other.result() for other in others]
    assert texts(batched.result()) == texts(first)
    assert httpx.get(f"{base}/health").json()["largest_batch"] > 1  # requests were batched
    _, streamed = _streamed(client, folder, asks[1], **params)
    assert [streamed[k] for k in range(3)] == texts(first)  # each choice's deltas reach its own index
    greedy = _ask(client, folder, asks[1], max_tokens=MAX_NEW, temperature=0, n=3)
    alone = _ask(client, folder, asks[1], max_tokens=MAX_NEW, temperature=0).choices[0].message.content
    assert texts(greedy) == [alone] * 3  # temperature 0: n equal greedy answers
    assert greedy.usage.completion_tokens == 3 * _ask(client, folder, asks[1], max_tokens=MAX_NEW,
                                                      temperature=0).usage.completion_tokens


def test_stop_cuts_the_answer_at_the_first_stop_string(client, folder, asks):
    whole = _ask(client, folder, asks[2], max_tokens=MAX_NEW, temperature=0)
    text = whole.choices[0].message.content
    stop = next(text[at:at + 2] for at in range(len(text) // 2, len(text) - 2) if text.index(text[at:at + 2]) > 0)
    expected = text[: text.index(stop)]
    for given in (stop, ["never-in-an-answer", stop]):
        reply = _ask(client, folder, asks[2], max_tokens=MAX_NEW, temperature=0, stop=given)
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens < whole.usage.completion_tokens  # generation stopped there
        _, streamed = _streamed(client, folder, asks[2], max_tokens=MAX_NEW, temperature=0, stop=given)
        assert streamed == {0: expected}  # nothing past the stop string was streamed
    untouched = _ask(client, folder, asks[2], max_tokens=MAX_NEW, temperature=0, stop="never-in-an-answer")
    assert untouched.choices[0].message.content == text and untouched.usage == whole.usage


def test_max_completion_tokens_bounds_the_answer(client, folder, asks):
    short = _ask(client, folder, asks[0], max_completion_tokens=3, temperature=0)
    whole = _ask(client, folder, asks[0], max_completion_tokens=MAX_NEW, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens > 3
    assert whole.choices[0].message.content.startswith(short.choices[0].message.content)
    same = _ask(client, folder, asks[0], max_completion_tokens=3, max_tokens=3, temperature=0)
    assert same.choices[0].message.content == short.choices[0].message.content
    unbounded = _ask(client, folder, asks[0], temperature=0)  # no bound given: the server's --max-new-tokens
    assert unbounded.choices[0].message.content == whole.choices[0].message.content
    for params, param in (({"max_completion_tokens": 3, "max_tokens": 4}, "max_completion_tokens"),
                          ({"max_completion_tokens": MAX_NEW + 1}, "max_completion_tokens"),
                          ({"max_tokens": MAX_NEW + 1}, "max_tokens")):
        with pytest.raises(openai.BadRequestError) as refused:
            _ask(client, folder, asks[0], **params)
        assert refused.value.param == param, refused.value.message


def test_usage_and_logprobs_equal_what_the_model_gives_directly(client, folder, model, asks):
    path, question = asks[3]
    reply = _ask(client, folder, asks[3], max_tokens=MAX_NEW, temperature=0, logprobs=True, top_logprobs=5)
    image = load_image(str(path))
    item = model.prompts.encode([image], format_prompt(question, model.answer_format))
    with torch.no_grad():
        row = model.generate_encoded([item], [image], MAX_NEW)[0].tolist()
    eos = model.prompts.eos_id
    generated = row[: row.index(eos) + 1] if eos in row else row
    assert reply.usage.prompt_tokens == len(item.input_ids)
    assert reply.usage.completion_tokens == len(generated)
    assert reply.usage.total_tokens == len(item.input_ids) + len(generated)
    content = reply.choices[0].logprobs.content
    tokenizer = model.processor.tokenizer
    assert [entry.token for entry in content] == [tokenizer.decode([t]) for t in generated]
    special = set(tokenizer.all_special_ids)
    spoken = b"".join(bytes(entry.bytes) for entry, t in zip(content, generated) if t not in special)
    assert spoken.decode().strip() == reply.choices[0].message.content
    expected = _model_logprobs(model, item, image, generated)
    for entry, value in zip(content, expected):
        tops = [top.logprob for top in entry.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0], abs=1e-6)  # greedy: the likeliest token was chosen
        assert entry.token == entry.top_logprobs[0].token
        assert sum(math.exp(t) for t in tops) <= 1 + 1e-6
        assert entry.logprob == pytest.approx(value, abs=1e-3)  # the model's own log-probability
    _, sampled = _streamed(client, folder, asks[3], max_tokens=MAX_NEW, temperature=1.0, seed=5, logprobs=True,
                           top_logprobs=3)
    chunks = list(_ask(client, folder, asks[3], stream=True, max_tokens=MAX_NEW, temperature=1.0, seed=5,
                       logprobs=True, top_logprobs=3, stream_options={"include_usage": True}))
    streamed = [entry for c in chunks for choice in c.choices if choice.logprobs for entry in choice.logprobs.content]
    whole = _ask(client, folder, asks[3], max_tokens=MAX_NEW, temperature=1.0, seed=5, logprobs=True, top_logprobs=3)
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole.choices[0].logprobs.content]
    assert len(streamed) == chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert sampled == {0: whole.choices[0].message.content}
    for entry in streamed:
        tops = [top.logprob for top in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and math.isfinite(entry.logprob) and entry.logprob <= tops[0]


def test_an_answer_that_ends_counts_its_end_token(model, asks, monkeypatch):
    """The tiny random model never ends within MAX_NEW tokens: with a token of its greedy answer taken as its
    end-of-answer token, `completion_tokens` counts through it, streamed or not, as a direct count does."""
    from fastapi.testclient import TestClient

    path, question = asks[0]
    image = load_image(str(path))
    item = model.prompts.encode([image], format_prompt(question, model.answer_format))
    with torch.no_grad():
        row = model.generate_encoded([item], [image], MAX_NEW)[0].tolist()
    end = next(token for at, token in enumerate(row) if at >= 2 and row.index(token) == at)  # first seen there
    monkeypatch.setattr(model.prompts, "eos_id", end)
    body = {"messages": _messages(path, question), "max_tokens": MAX_NEW, "temperature": 0}
    with TestClient(create_app("tiny", ServeSettings(), model=model)) as server:
        whole = server.post("/v1/chat/completions", json=body).json()
        streamed = server.post("/v1/chat/completions", json={**body, "stream": True,
                                                              "stream_options": {"include_usage": True}})
    events = [json.loads(line[len("data: "):]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]
    assert whole["choices"][0]["finish_reason"] == "stop"
    assert whole["usage"]["completion_tokens"] == row.index(end) + 1 == events[-1]["usage"]["completion_tokens"]


def _model_logprobs(model: MedSynapseV, item, image, generated: list[int]) -> list[float]:
    """log p(token | prompt, tokens before) from one forward over prompt + answer, over the tokens the model may
    emit (the structural ones it never emits masked out, as generation does)."""
    tokens = torch.tensor([generated])
    with torch.no_grad():
        batch = model.prompts.collate([item], with_answers=False)
        features = vision_features(model.vlm, batch)
        memory = model.memory_for(batch, [image], features)
        logits = completion_outputs(model.vlm, batch, memory, tokens, completion_mask(tokens, model.prompts.eos_id),
                                    model.latent_id, features).float()
    logits[..., model.prompts.suppressed_ids] = float("-inf")
    return logits.log_softmax(-1)[0].gather(1, tokens.T)[:, 0].tolist()


def test_models_are_listed_and_retrieved(client, folder):
    listed = client.models.list().data
    assert [m.id for m in listed] == [folder.name]
    assert listed[0].owned_by == "medsynapse" and listed[0].created > 0 and listed[0].object == "model"
    assert client.models.retrieve(folder.name) == listed[0]
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert (missing.value.code, missing.value.param) == ("model_not_found", "model")
    assert "gpt-4o" in missing.value.message


UNSUPPORTED = {  # param: what the client sends
    "tools": {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    "tool_choice": {"tool_choice": "auto"},
    "response_format": {"response_format": {"type": "json_object"}},
    "frequency_penalty": {"frequency_penalty": 0.5},
    "presence_penalty": {"presence_penalty": -1},
    "logit_bias": {"logit_bias": {"17": 5}},
    "audio": {"audio": {"voice": "alloy", "format": "wav"}},
    "modalities": {"modalities": ["text", "audio"]},
    "parallel_tool_calls": {"parallel_tool_calls": True},
    "reasoning_effort": {"reasoning_effort": "high"},
    "store": {"store": True},
    "unknown_field": {"extra_body": {"unknown_field": 1}},
    "top_logprobs": {"top_logprobs": 2},  # without logprobs
    "stream_options": {"stream_options": {"include_usage": True}},  # without stream
    "stop": {"stop": ["a", "b", "c", "d", "e"]},
    "n": {"n": 9},  # more than --max-batch
    "top_p": {"top_p": 0},
    "messages[0].content[0].image_url.detail": {"detail": "high"},
}


REASONS = {  # the refusals of a served parameter's bad value say why (the others: "not supported")
    "top_logprobs": "needs logprobs: true", "stream_options": "only allowed with stream: true",
    "stop": "5 stop strings, at most 4", "n": "more than this server's limit"}


OPENAI_UNSERVED = {  # OpenAI's parameters this server does not serve, each with a value that asks for nothing
    "frequency_penalty": 0, "presence_penalty": None, "logit_bias": {}, "tools": [], "tool_choice": "none",
    "parallel_tool_calls": None, "functions": [], "function_call": "none", "response_format": {"type": "text"},
    "audio": None, "modalities": ["text"], "prediction": None, "reasoning_effort": None, "verbosity": None,
    "web_search_options": None, "store": False, "metadata": {}, "service_tier": "default"}


def test_every_unserved_parameter_is_a_400_naming_it(client, folder, asks):
    for param, given in UNSUPPORTED.items():
        params = dict(given)
        messages = _messages(*asks[0])
        if "detail" in params:
            messages[0]["content"][0]["image_url"]["detail"] = params.pop("detail")
        for stream in (False, True):
            if stream and param == "stream_options":
                continue
            extra = {"stream": True} if stream else {}
            with pytest.raises(openai.BadRequestError) as refused:
                client.chat.completions.create(model=folder.name, messages=messages, max_tokens=4, **params, **extra)
            assert refused.value.param == param, (param, refused.value.message)
            assert param.split(".")[-1] in refused.value.message
            assert REASONS.get(param, "") in refused.value.message, (param, refused.value.message)
            if param in OPENAI_UNSERVED or param == "unknown_field":  # OpenAI's code: not served / not OpenAI's
                assert refused.value.code == ("unknown_parameter" if param == "unknown_field"
                                              else "unsupported_parameter"), param
    neutral = _ask(client, folder, asks[0], max_tokens=4, temperature=0, frequency_penalty=0, presence_penalty=0,
                   logit_bias={}, response_format={"type": "text"}, store=False, user="someone")
    every_neutral = _ask(client, folder, asks[0], max_tokens=4, temperature=0,  # each unserved one, asking nothing
                         extra_body=OPENAI_UNSERVED)
    assert every_neutral.choices[0].message.content == neutral.choices[0].message.content
    assert neutral.choices[0].message.content == _ask(client, folder, asks[0], max_tokens=4,
                                                      temperature=0).choices[0].message.content


def test_the_bounds_hold_for_streams_before_the_first_byte(client, folder, asks):
    long = (asks[0][0], " ".join(["is there a lesion"] * 1200))
    with pytest.raises(openai.APIStatusError) as refused:
        _ask(client, folder, long, stream=True, max_tokens=4)
    assert refused.value.status_code == 413 and refused.value.code == "context_length_exceeded"
    buffer = io.BytesIO()
    Image.effect_noise((700, 700), 64).convert("RGB").save(buffer, format="PNG")  # over --max-body-mb 1 as base64
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    big = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                        {"type": "text", "text": "q"}]}]
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model=folder.name, messages=big, stream=True, max_tokens=4)
    assert refused.value.status_code == 413 and refused.value.code == "body_too_large"


def test_a_late_stream_is_a_json_504_and_a_late_or_failed_token_mid_stream_an_error_event(model, asks,
                                                                                          monkeypatch):
    """Before the first token the stream has sent nothing: a late answer is a JSON 504. After it, a late or failed
    token is one error event in OpenAI's shape, and no [DONE]."""
    from fastapi.testclient import TestClient

    import medsynapse.serve_choices as choices

    push = choices.Choice.push
    body = {"messages": _messages(*asks[0]), "stream": True, "max_tokens": 8, "temperature": 0}

    def streamed(at: int, trouble) -> httpx.Response:
        def troubled(self, token, entry=None):
            if len(self.tokens) == at:
                trouble()
            return push(self, token, entry)

        monkeypatch.setattr(choices.Choice, "push", troubled)
        with TestClient(create_app("tiny", ServeSettings(timeout_s=2.0), model=model)) as server:
            return server.post("/v1/chat/completions", json=body)

    def fail():
        raise RuntimeError("the second token")

    late = streamed(0, lambda: time.sleep(3))
    assert late.status_code == 504 and late.headers["content-type"] == "application/json"
    assert late.json() == {"error": {"message": "no answer within 2.0 s", "type": "timeout", "param": None,
                                     "code": "timeout"}}
    for trouble, error in ((lambda: time.sleep(3), ("no answer within 2.0 s", "timeout", "timeout")),
                           (fail, ("the server failed to answer (RuntimeError)", "server_error", None))):
        reply = streamed(1, trouble)
        events = [line[len("data: "):] for line in reply.text.splitlines() if line.startswith("data: ")]
        assert reply.status_code == 200 and json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
        message, kind, code = error
        assert json.loads(events[-1]) == {"error": {"message": message, "type": kind, "param": None, "code": code}}
        assert "[DONE]" not in events


class _Pieces:
    """A tokenizer over byte pieces (id 0 is the end of the answer): decoding joins them as UTF-8."""

    def __init__(self, *pieces: bytes):
        self.pieces = [b"", *pieces]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", "replace")


def _deltas(pieces: list[bytes], stops: tuple[str, ...], end: bool) -> tuple[list[str], Choice]:
    """The text deltas a choice hands out for `pieces` (then its end token, or the length limit)."""
    from types import SimpleNamespace

    vocabulary = Vocabulary(SimpleNamespace(processor=SimpleNamespace(tokenizer=_Pieces(*pieces)),
                                            prompts=SimpleNamespace(eos_id=0)))
    choice = Choice(vocabulary, stops)
    out = []
    for token in [*range(1, len(pieces) + 1), 0] if end else range(1, len(pieces) + 1):
        if choice.done:
            break
        out.append(choice.push(token).text)
    if not choice.done:
        out.append(choice.finish("length").text)
    return out, choice


def test_a_choice_hands_out_only_text_no_later_token_can_change():
    """Deltas join to the answer; an unfinished character, trailing whitespace and a possible start of a stop string
    are held back until settled."""
    deltas, choice = _deltas([b" Hel", b"lo w", b"or", b"ld", b" and more"], ("o wor",), end=True)
    assert deltas == ["Hel", "l", ""] and choice.text == "Hell" and choice.finish_reason == "stop"
    assert choice.completion_tokens == 3  # the token that completed the stop string was the last
    deltas, choice = _deltas([b"caf", b"\xc3", b"\xa9 ", b"ok  "], (), end=True)
    assert deltas == ["caf", "", "\u00e9", " ok", ""] and choice.text == "caf\u00e9 ok"
    assert (choice.finish_reason, choice.completion_tokens) == ("stop", 5)
    deltas, choice = _deltas([b"a", b" b", b" "], ("b c",), end=False)
    assert deltas == ["a", " ", "", "b"] and choice.text == "a b" and choice.finish_reason == "length"
