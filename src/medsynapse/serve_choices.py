"""The server's choices as their tokens arrive: text deltas, stop strings, log-probabilities and keyed sampling.

`medsynapse serve` answers a batch of requests in one `generate` call; each generated row is one choice of one
request. Plan of a batch (serve.Batcher runs it):
1. `RowFeed`, a transformers `StoppingCriteria`, sees every new token of every row as generation goes; it hands each
   row's token to that row's `Choice`, which turns the growing token list into text deltas (held back while a later
   token could still change them: an unfinished character, trailing whitespace, the start of a stop string), finds
   the first stop string, and says when the row is done (its end-of-answer token, a stop string, its client gone),
   which stops the row's generation;
2. `StepLogprobs`, a `LogitsProcessor` placed after the model's own token suppression and before any sampling, keeps
   each step's log-softmax for the rows that asked for `logprobs` (the model's distribution, before temperature and
   top_p, over the tokens the model may emit);
3. sampled rows draw through `model.sampling.KeyedSampler` (Gumbel-max keyed per row by the request's seed and the
   choice's index), so a row's tokens depend on its seed, its choice and its logits only, never on the batch;
4. the rows still open when `max_tokens` is spent finish with "length".
A choice's final text is the streamed deltas joined: the same `Choice` serves streamed and whole answers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
from transformers import LogitsProcessor, StoppingCriteria

REPLACEMENT = "\ufffd"  # what a decoder shows for an unfinished multi-byte character


@dataclass
class Delta:
    """What one token adds to a choice: text (may be empty while held back), its logprob entries, the finish."""

    text: str = ""
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None


class Vocabulary:
    """The model's tokenizer's views of token ids: an answer's text, and a token's own text and bytes (for logprobs).
    The model's tokenizer and end-of-answer token are looked up when first needed."""

    def __init__(self, model):
        self.model = model

    @cached_property
    def tokenizer(self):
        return self.model.processor.tokenizer

    @cached_property
    def eos_id(self) -> int:
        return self.model.prompts.eos_id

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def entry(self, token: int, logprob: float) -> dict:
        """OpenAI's logprob entry for one token: its text, log-probability and UTF-8 bytes."""
        text = self.tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(self.token_bytes(token, text))}

    def token_bytes(self, token: int, text: str) -> bytes:
        """A byte-level BPE token's own bytes (a token may hold part of a character); else its text's UTF-8."""
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(piece, str) and piece and all(char in self._byte_of for char in piece):
            return bytes(self._byte_of[char] for char in piece)
        return text.encode("utf-8")

    @cached_property
    def _byte_of(self) -> dict[str, int]:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        return {char: byte for byte, char in bytes_to_unicode().items()}


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest of `stops` begins in `text`, None when none occurs."""
    found = [at for at in (text.find(stop) for stop in stops) if at >= 0]
    return min(found) if found else None


def settled(text: str, stops: tuple[str, ...]) -> str:
    """The part of a growing answer no later token can change: without its trailing whitespace (the answer is
    stripped), an unfinished character, or an ending that may be the beginning of a stop string."""
    text = text.rstrip().rstrip(REPLACEMENT).rstrip()
    hold = max((size for stop in stops for size in range(1, len(stop)) if text.endswith(stop[:size])), default=0)
    return text[: len(text) - hold]


class Choice:
    """One choice's answer as its tokens arrive (`push`), ended by its end-of-answer token, a stop string or
    `finish` ("length"); `text` is what its deltas join to."""

    def __init__(self, vocabulary: Vocabulary, stops: tuple[str, ...] = (), logprobs: int | None = None):
        self.vocabulary, self.stops, self.top_logprobs = vocabulary, stops, logprobs  # logprobs: None or top-k
        self.tokens: list[int] = []
        self.logprobs: list[dict] = []
        self.finish_reason: str | None = None
        self.cut: str | None = None  # the text before the first stop string, once one appears
        self.emitted = ""  # the text handed out so far

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def completion_tokens(self) -> int:
        """The tokens generated for this choice: through its end-of-answer token or the one completing a stop."""
        return len(self.tokens)

    @property
    def text(self) -> str:
        return self.cut if self.cut is not None else self.vocabulary.text(self.tokens).strip()

    def push(self, token: int, entry: dict | None = None) -> Delta:
        """The next token (and its logprob entry): the text it settles, and the finish when it ends the choice."""
        self.tokens.append(token)
        entries = [entry] if entry is not None else []
        self.logprobs += entries
        if token == self.vocabulary.eos_id:
            return self.finish("stop", entries)
        text = self.vocabulary.text(self.tokens).lstrip()
        at = first_stop(text, self.stops)
        if at is not None:
            self.cut = text[:at]
            return self.finish("stop", entries)
        return Delta(self._advance(settled(text, self.stops)), entries)

    def finish(self, reason: str, entries: list[dict] | None = None) -> Delta:
        """End the choice: the rest of its text and the reason."""
        self.finish_reason = reason
        return Delta(self._advance(self.text), entries or [], reason)

    def _advance(self, target: str) -> str:
        """The text of `target` past what was handed out, which `target` extends."""
        if len(target) <= len(self.emitted) or not target.startswith(self.emitted):
            return ""
        delta, self.emitted = target[len(self.emitted):], target
        return delta


def choice_key(seed: int, choice: int) -> int:
    """A sampled row's key for `KeyedSampler`: the request's seed and the choice's index, within int64."""
    return (seed * 1_000_003 + choice) % 2**63


class StepLogprobs(LogitsProcessor):
    """Keeps each step's log-softmax of the scores it is given; hands them on unchanged."""

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.last = scores.float().log_softmax(-1)
        return scores


@dataclass
class Row:
    """One generated row: its choice, and whom to tell of each delta (`listen(delta)`) and whether to keep going."""

    choice: Choice
    listen: Callable[[Delta], None] | None = None
    cancelled: Callable[[], bool] = lambda: False


class RowFeed(StoppingCriteria):
    """Each step's new token of each row handed to the row's choice; a row is done once its choice is (or its client
    left). `logprobs`: the step log-probabilities, when some row asked for them."""

    def __init__(self, rows: list[Row], vocabulary: Vocabulary, logprobs: StepLogprobs | None = None):
        self.rows, self.vocabulary, self.step_logprobs = rows, vocabulary, logprobs

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        tokens = input_ids[:, -1]
        entries = self._entries(tokens)
        for number, (row, token) in enumerate(zip(self.rows, tokens.tolist())):
            if row.choice.done:
                continue
            if row.cancelled():
                row.choice.finish_reason = "cancelled"
                continue
            self.tell(row, row.choice.push(token, entries[number]))
        return torch.tensor([row.choice.done for row in self.rows], dtype=torch.bool, device=input_ids.device)

    def finish(self) -> None:
        """The rows still open after the last step ran out of tokens."""
        for row in self.rows:
            if not row.choice.done:
                self.tell(row, row.choice.finish("length"))

    @staticmethod
    def tell(row: Row, delta: Delta) -> None:
        if row.listen is not None:
            row.listen(delta)

    def _entries(self, tokens: torch.Tensor) -> list[dict | None]:
        """Each row's logprob entry for its new token (with its `top_logprobs` likeliest alternatives), or None."""
        wanted = [row.choice.top_logprobs for row in self.rows]
        if self.step_logprobs is None or self.step_logprobs.last is None or all(k is None for k in wanted):
            return [None] * len(self.rows)
        logp = self.step_logprobs.last
        chosen = logp.gather(1, tokens.to(logp.device)[:, None])[:, 0].tolist()
        k = max(k or 0 for k in wanted)
        top_value_tensor, top_id_tensor = (logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long()))
        top_values, top_ids = top_value_tensor.tolist(), top_id_tensor.tolist()
        out: list[dict | None] = []
        for number, (token, want) in enumerate(zip(tokens.tolist(), wanted)):
            if want is None:
                out.append(None)
                continue
            entry = self.vocabulary.entry(token, chosen[number])
            entry["top_logprobs"] = [self.vocabulary.entry(alternative, value) for alternative, value in
                                     zip(top_ids[number][:want], top_values[number][:want]) if math.isfinite(value)]
            out.append(entry)
        return out
