"""`medsynapse serve --model DIR`: an OpenAI-compatible chat-completions server with dynamic batching.

Endpoints: `POST /v1/chat/completions` (messages whose content holds text and `image_url` parts: `data:` URIs of
PNG / JPEG / DICOM, or local paths under an `--allow-dir`), `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`.
The chat parameters served: `max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `n`, `seed`, `stop`,
`logprobs` / `top_logprobs`, `stream` / `stream_options.include_usage`; OpenAI's others (tools, response_format,
penalties, logit_bias, ...) are refused unless sent at the value that asks for nothing (`refuse_unsupported`).
Plan of a request:
1. the body is refused past `max_body_bytes` (413) before it is read whole (a chunked body is read up to the limit);
   FastAPI checks the schema (400 naming the field, never echoing the input); every parameter is checked (400 naming
   it) before any image is decoded;
2. in a worker thread, within `timeout_s` (504): a compressed upload (a gzip'd NIfTI, a Deflated DICOM) is inflated
   at most to `max_decoded_bytes` (413), the images are decoded by the same loader as training and evaluation
   (data/images.py: DICOM windowed), checked against `max_pixels` (413), and the prompt is encoded as `predict` does
   (the model's answer format); a bad image is a 400 naming the message and part; a prompt longer than the model's
   context less `max_tokens` is a 413;
3. the encoded request joins a bounded queue (503 when full) and waits for its answer until `timeout_s` is spent
   (504);
4. one batcher thread takes the first waiting request and every other that arrives within `max_wait_ms`, up to
   `max_batch`, groups them by generation settings and packs each group by prompt length into batches whose padded
   size, rows x (longest prompt + max_tokens), stays within `max_batch_tokens` (a long prompt is not padded against
   short ones), and runs each batch through `MedSynapseV.generate_encoded`, the path `answer` and the benchmark
   harness use (left-padded batch, greedy unless a temperature is asked for), so a batched answer is the answer the
   request would get alone. A sampled request is one row per choice, keyed by its seed and the choice's index
   (serve_choices.py), so its samples do not depend on the batch either; a greedy request is one row whatever `n`;
5. each row's tokens reach its `Choice` as they are generated (serve_choices.RowFeed): the text deltas a stream
   sends, the cut at a stop string, the logprobs; a streamed request waits for its first token before its 200 (an
   error until then is a JSON error), then sends `chat.completion.chunk` events and `data: [DONE]`.
Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}` (mid-stream: one such event, no
[DONE]). The model package knows nothing of HTTP: this module only parses, queues and formats. Binds 127.0.0.1 by
default.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import math
import os
import queue
import secrets
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from pydantic import BaseModel, ConfigDict, Field

from medsynapse.serve_choices import Choice, Delta, Row, RowFeed, StepLogprobs, Vocabulary, choice_key

if TYPE_CHECKING:
    from medsynapse.model.bases import BaseFolders

MIME_SUFFIXES = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "application/dicom": ".dcm",
                 "image/dicom": ".dcm", "application/x-nifti": ".nii", "application/gzip": ".nii.gz",
                 "application/x-nifti-gz": ".nii.gz"}  # gzip: a compressed NIfTI volume


DECODED_BYTES_PER_PIXEL = 32  # the default inflate / decode bound: 32 bytes per `max_pixels` pixel (512 MiB)


@dataclass
class ServeSettings:
    max_batch: int = 16
    max_wait_ms: float = 10.0
    max_queue: int = 256
    max_new_tokens: int = 64  # the default and the largest `max_tokens` a request may ask for
    max_pixels: int = 4096 * 4096
    max_body_bytes: int = 32 * 2**20
    max_images: int = 4
    timeout_s: float = 120.0  # from the request's arrival: decoding, waiting and answering
    allow_dirs: list[str] = field(default_factory=list)  # local image paths are read only under these folders
    max_batch_tokens: int = 16384  # a batch's padded size, rows x (longest prompt + max_new_tokens)
    max_decoded_bytes: int | None = None  # inflated / decoded image data; None: DECODED_BYTES_PER_PIXEL x max_pixels
    engine: str = "hf"  # hf: transformers' generate | vllm: vLLM with the memory injected (needs .venv-vllm)
    vllm_context: int = 8192  # with vllm: the engine's context (its KV cache holds at least one prompt this long)

    @property
    def decoded_limit(self) -> int:
        return self.max_decoded_bytes or DECODED_BYTES_PER_PIXEL * self.max_pixels


ERROR_TYPES = {500: "server_error", 503: "server_busy", 504: "timeout"}  # any other status: invalid_request_error


class BadRequest(Exception):
    """A refusal: its HTTP status, a message naming what was wrong, and OpenAI's `code` and `param` (or None)."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param

    @classmethod
    def at(cls, where: str, status: int, text: str, code: str | None = None) -> BadRequest:
        """A refusal about the request field `where` (`messages[0].content[1].image_url`), which its message names."""
        return cls(status, f"{where}: {text}", code, where)


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


# --- the OpenAI request schema -----------------------------------------------------------------------------------


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    detail: Literal["auto"] | None = None  # "low" / "high" would ask for another resolution: not served


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[ContentPart]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None


class ChatRequest(BaseModel):
    """The chat-completion parameters this server serves. Any other field is kept aside (`model_extra`) and refused
    by `refuse_unsupported`, unless it is one of OpenAI's sent at the value that asks for nothing."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)  # None: 0, greedy (OpenAI's default is 1)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    user: str | None = None  # identifiers of the caller: accepted, they change no answer
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None


NEUTRAL: dict[str, tuple] = {  # OpenAI's parameters this server does not serve, and the values that ask for nothing
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
    "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None,), "functions": (None, []),
    "function_call": (None, "none"), "response_format": (None, {"type": "text"}), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,), "verbosity": (None,),
    "web_search_options": (None,), "store": (None, False), "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
}


def refuse_unsupported(request: ChatRequest) -> None:
    """A 400 naming the first field this server would otherwise ignore: one of OpenAI's it does not serve
    (`unsupported_parameter`), or one OpenAI does not know (`unknown_parameter`)."""
    for name, value in (request.model_extra or {}).items():
        if name not in NEUTRAL:
            raise BadRequest.at(name, 400, "unrecognized request argument; this server serves "
                                           f"{', '.join(ChatRequest.model_fields)}", "unknown_parameter")
        if not any(_same(value, neutral) for neutral in NEUTRAL[name]):
            accepted = " or ".join(json.dumps(v) for v in NEUTRAL[name][1:])
            raise BadRequest.at(name, 400, "not supported by this server; omit it" +
                                (f" or send {accepted}" if accepted else ""), "unsupported_parameter")


def _same(value, neutral) -> bool:
    """Equal, and both or neither a bool (JSON's false is not 0)."""
    return value == neutral and isinstance(value, bool) == isinstance(neutral, bool)


@dataclass(frozen=True)
class Options:
    """A request's choices beyond their length and temperature: how many, their sampling and what they report."""

    n: int = 1
    top_p: float = 1.0
    seed: int = 0  # the sampled rows' key; a random one when the request gives none
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs; k: each token's logprob and its k likeliest alternatives


def max_new_tokens_of(request: ChatRequest, settings: ServeSettings) -> int:
    """`max_completion_tokens` or its older name `max_tokens` (400 when both differ), at most the server's limit."""
    given = {k: v for k in ("max_completion_tokens", "max_tokens") if (v := getattr(request, k)) is not None}
    if len(set(given.values())) > 1:
        raise BadRequest.at("max_completion_tokens", 400, f"{given['max_completion_tokens']} differs from max_tokens "
                                                          f"{given['max_tokens']}; send one of them")
    param, value = next(iter(given.items()), ("max_tokens", settings.max_new_tokens))
    if value > settings.max_new_tokens:
        raise BadRequest.at(param, 400, f"{value} is over this server's limit {settings.max_new_tokens} "
                                        "(--max-new-tokens)")
    return value


def options_of(request: ChatRequest, settings: ServeSettings) -> Options:
    """The request's `Options`; each inconsistent or out-of-bounds parameter a 400 naming it."""
    n = request.n or 1
    if n > settings.max_batch:
        raise BadRequest.at("n", 400, f"{n} choices, more than this server's limit {settings.max_batch} (--max-batch)")
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if len(stop) > 4:
        raise BadRequest.at("stop", 400, f"{len(stop)} stop strings, at most 4")
    if "" in stop:
        raise BadRequest.at("stop", 400, "an empty stop string")
    if request.top_logprobs is not None and not request.logprobs:
        raise BadRequest.at("top_logprobs", 400, "needs logprobs: true")
    if request.stream_options is not None and not request.stream:
        raise BadRequest.at("stream_options", 400, "only allowed with stream: true")
    seed = request.seed if request.seed is not None else secrets.randbits(63)
    return Options(n, request.top_p or 1.0, seed, stop, (request.top_logprobs or 0) if request.logprobs else None)


# --- parsing ---------------------------------------------------------------------------------------------------


@dataclass
class Parsed:
    question: str
    system: str
    images: list  # PIL images
    wheres: list[str] = field(default_factory=list)  # each image's part (`messages[0].content[1]`)


def parse_request(request: ChatRequest, settings: ServeSettings) -> Parsed:
    """The last user message's text and images, the system message; every problem a BadRequest naming it."""
    system = " ".join(_text(m.content) for m in request.messages if m.role in ("system", "developer")).strip()
    users = [i for i, m in enumerate(request.messages) if m.role == "user"]
    if not users:
        raise BadRequest.at("messages", 400, "no message with role 'user'")
    index = users[-1]
    content = request.messages[index].content
    parts = [ContentPart(type="text", text=content)] if isinstance(content, str) else content
    count = sum(part.type == "image_url" for part in parts)
    if count > settings.max_images:  # before any image is decoded
        raise BadRequest.at(f"messages[{index}]", 413, f"{count} images, at most {settings.max_images}",
                            "too_many_images")
    texts, images, wheres = [], [], []
    for number, part in enumerate(parts):
        where = f"messages[{index}].content[{number}]"
        if part.type == "text":
            if part.text is None:
                raise BadRequest.at(where, 400, "a text part needs 'text'")
            texts.append(part.text)
        else:
            if part.image_url is None:
                raise BadRequest.at(where, 400, "an image_url part needs 'image_url': {'url': ...}")
            images.append(load_request_image(part.image_url.url, where, settings))
            wheres.append(where)
    question = " ".join(t.strip() for t in texts).strip()
    if not question:
        raise BadRequest.at(f"messages[{index}]", 400, "no question text")
    if not images:
        raise BadRequest.at(f"messages[{index}]", 400,
                            "no image (an image_url part with a data: URI or an allowed path)")
    return Parsed(question, system, images, wheres)


def _text(content: str | list[ContentPart]) -> str:
    return content if isinstance(content, str) else " ".join(p.text or "" for p in content if p.type == "text")


def load_request_image(url: str, where: str, settings: ServeSettings):
    """A `data:` URI (PNG, JPEG, DICOM, NIfTI) or an allowed local path, opened by the project's image loader. A NIfTI
    volume's view follows a '#' (`...#axis=coronal&slice=40&window=40,400`; default the middle axial slice)."""
    from medsynapse.data.images import is_nifti, load_image, split_view
    from medsynapse.data.schema import DataError

    where = f"{where}.image_url"
    path: str | Path  # the temporary file's name (a data: URI), or the resolved local file
    if url.startswith("data:"):
        url, _, fragment = url.partition("#")  # base64 has no '#': what follows is a volume's view
        header, sep, payload = url.partition(",")
        mime = header[5:].split(";")[0].lower()
        if not sep or ";base64" not in header:
            raise BadRequest.at(where, 400, "expected data:<type>;base64,<data>")
        if mime not in MIME_SUFFIXES:
            raise BadRequest.at(where, 415, f"type {mime!r} is not served; one of {sorted(MIME_SUFFIXES)}",
                                "unsupported_media_type")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest.at(where, 400, "not valid base64") from None
        if fragment and not MIME_SUFFIXES[mime].startswith(".nii"):
            raise BadRequest.at(where, 400, f"a view after '#' applies to NIfTI volumes, not {mime!r}")
        if mime.startswith("image/") and MIME_SUFFIXES[mime] in (".png", ".jpg"):  # decoded in memory
            picture = _picture_from_bytes(data, where, settings)
            if picture is not None:
                return picture
        handle, path = tempfile.mkstemp(suffix=MIME_SUFFIXES[mime])
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            _check_inflated(path, where, settings)
            _check_size(path, where, settings)
            image = _open(load_image, f"{path}#{fragment}" if fragment else path, where, DataError)
        finally:
            os.unlink(path)
    else:
        file, fragment = split_view(url.removeprefix("file://"))
        path = Path(file).expanduser().resolve()
        if not any(path.is_relative_to(Path(d).expanduser().resolve()) for d in settings.allow_dirs):
            raise BadRequest.at(where, 403, f"local paths are read only under --allow-dir "
                                            f"({settings.allow_dirs or 'none given'}); send a data: URI",
                                "path_not_allowed")
        _check_inflated(str(path), where, settings)
        _check_size(str(path), where, settings)
        shown = f"{path}#{fragment}" if fragment and is_nifti(str(path)) else str(path)
        image = _open(load_image, shown, where, DataError)
    return image


def _picture_from_bytes(data: bytes, where: str, settings: ServeSettings):
    """A PNG / JPEG upload decoded from memory (no temporary file): its size from the header first, then the pixels.
    None when PIL does not recognise it (e.g. a DICOM sent as image/png): the loader's path through a file then
    reads it or names the problem."""
    import io

    from PIL import Image, UnidentifiedImageError

    from medsynapse.data.images import open_picture
    from medsynapse.data.schema import DataError

    try:
        with Image.open(io.BytesIO(data)) as header:
            size = header.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError):
        return None
    _refuse_past_max_pixels(size, where, settings)
    try:
        return open_picture(io.BytesIO(data), "the image", where)
    except DataError as err:
        raise BadRequest.at(where, 400, str(err), "invalid_image") from None


def _check_inflated(path: str, where: str, settings: ServeSettings) -> None:
    """A gzip'd NIfTI or a Deflated DICOM inflated (counted, not kept) at most to `decoded_limit` bytes, refused
    beyond before any loader inflates it whole."""
    from medsynapse.data.images import TooLarge, check_inflated_size

    try:
        check_inflated_size(path, settings.decoded_limit)
    except TooLarge:
        raise BadRequest.at(where, 413, f"the compressed data inflates to more than {settings.decoded_limit} bytes "
                                        "(--max-decoded-mb)", "decoded_too_large") from None


def _check_size(path: str, where: str, settings: ServeSettings) -> None:
    """Width x height from the file's header (PNG/JPEG via PIL's lazy open, DICOM's Rows/Columns), refused past
    `max_pixels` before any pixel is decoded (a small compressed file can decode to gigabytes); a DICOM's pixel data,
    every frame, refused past `decoded_limit` bytes."""

    from medsynapse.data.images import is_nifti

    size = None
    if is_nifti(path):  # a volume: its largest plane, from the header
        try:
            import nibabel as nib

            dims = sorted(int(n) for n in cast("nib.Nifti1Image", nib.load(path)).shape[:3])  # .nii(.gz): Nifti1/2
            size = (dims[-1], dims[-2] if len(dims) > 1 else 1)
        except Exception:  # not a volume: the loader names what is wrong
            return
    else:
        size = _picture_size(path, where, settings)
    if size is not None:
        _refuse_past_max_pixels(size, where, settings)


def _refuse_past_max_pixels(size: tuple[int, int], where: str, settings: ServeSettings) -> None:
    if size[0] * size[1] > settings.max_pixels:
        raise BadRequest.at(where, 413, f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels, more than "
                                        f"--max-pixels {settings.max_pixels}", "image_too_large")


def _picture_size(path: str, where: str, settings: ServeSettings) -> tuple[int, int] | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        pass
    return _dicom_size(path, where, settings)


def _dicom_size(path: str, where: str, settings: ServeSettings) -> tuple[int, int] | None:
    """A DICOM's (columns, rows) from its header; its pixel data, every frame, refused past `decoded_limit` bytes."""
    try:
        import pydicom

        header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        size, decoded = (int(header.Columns), int(header.Rows)), _dicom_decoded_bytes(header)
    except Exception:  # not an image: the loader names what is wrong
        return None
    if decoded > settings.decoded_limit:
        raise BadRequest.at(where, 413, f"the DICOM's pixel data decodes to {decoded} bytes (every frame), more "
                                        f"than {settings.decoded_limit} (--max-decoded-mb)", "decoded_too_large")
    return size


def _dicom_decoded_bytes(header) -> int:
    """Frames x rows x columns x samples x bytes per sample: what `pixel_array` allocates for the whole file."""
    frames = int(getattr(header, "NumberOfFrames", 1) or 1)
    samples = int(getattr(header, "SamplesPerPixel", 1) or 1)
    sample_bytes = -(-int(getattr(header, "BitsAllocated", 8) or 8) // 8)
    return frames * int(header.Rows) * int(header.Columns) * samples * sample_bytes


def _open(load_image, path: str, where: str, data_error: type[Exception]):
    try:
        return load_image(path)
    except data_error as err:  # the server's own file names (a temporary upload) are not the client's business
        from medsynapse.data.images import split_view

        message = str(err).replace(path, "the image").replace(split_view(path)[0], "the image")
        raise BadRequest.at(where, 400, message, "invalid_image") from None


# --- batching ----------------------------------------------------------------------------------------------------


@dataclass
class Job:
    item: object  # EncodedPrompt
    images: list  # every image of the request (the memory is built from all of them)
    max_new_tokens: int
    temperature: float
    prompt_tokens: int = 0  # len(item.input_ids): text, image and memory-slot tokens
    future: Future = field(default_factory=Future)  # its choices, a `Choice` each, once the batch is done
    cancelled: bool = False
    options: Options = field(default_factory=Options)
    listen: Callable[[int, Delta], None] | None = None  # (choice index, delta) as the tokens arrive (a stream)
    question: str = ""  # the prompt's text and system message, for an engine that renders the chat itself (vLLM)
    system: str = ""

    @property
    def rows(self) -> int:
        """The rows it takes in a batch: one per choice when sampled, one for all when greedy (they are equal)."""
        return self.options.n if self.temperature > 0 else 1

    @property
    def setting(self) -> tuple[int, float, float]:
        """What its batch shares: max_new_tokens, temperature and (sampled) top_p."""
        return self.max_new_tokens, self.temperature, self.options.top_p if self.temperature > 0 else 1.0


def pack(jobs: list[Job], max_batch_tokens: int) -> list[list[Job]]:
    """Jobs of one generation setting in batches by prompt length, each batch's padded size, rows x (its longest
    prompt + max_new_tokens), at most `max_batch_tokens`: a long prompt is batched with prompts of its own length, and
    one whose padded size alone passes the bound is answered alone, never padding short prompts to its length."""
    batches: list[list[Job]] = []
    for job in sorted(jobs, key=lambda j: j.prompt_tokens):  # each job is the longest of its batch so far
        width = job.prompt_tokens + job.max_new_tokens
        if batches and (sum(j.rows for j in batches[-1]) + job.rows) * width <= max_batch_tokens:
            batches[-1].append(job)
        else:
            batches.append([job])
    return batches


class Batcher:
    """One thread that answers queued jobs in dynamic batches through the model's one generation path."""

    def __init__(self, model, settings: ServeSettings, engine=None):
        self.model, self.settings, self.engine = model, settings, engine  # engine: a VLLMEngine, or None
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=settings.max_queue)
        self.batches = 0  # batches run so far, and the largest (/health reports them)
        self.largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medsynapse-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise BadRequest(503, f"queue full ({self.settings.max_queue} requests waiting); retry later",
                             "queue_full") from None
        return job.future

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _take(self) -> list[Job]:
        try:
            first = self.jobs.get(timeout=0.1)
        except queue.Empty:
            return []
        batch, deadline = [first], time.monotonic() + self.settings.max_wait_ms / 1000
        while len(batch) < self.settings.max_batch:
            left = deadline - time.monotonic()
            try:
                batch.append(self.jobs.get(timeout=left) if left > 0 else self.jobs.get_nowait())
            except queue.Empty:
                break
        # a job whose request gave up (504) is skipped; the others can no longer be cancelled
        return [job for job in batch if not job.cancelled and job.future.set_running_or_notify_cancel()]

    def _run(self) -> None:
        while not self._stop.is_set():
            groups: dict[tuple[int, float, float], list[Job]] = {}
            for job in self._take():
                groups.setdefault(job.setting, []).append(job)
            for (max_new_tokens, temperature, _), group in groups.items():
                for batch in pack(group, self.settings.max_batch_tokens):
                    self._run_batch(batch, max_new_tokens, temperature)

    def _run_batch(self, batch: list[Job], max_new_tokens: int, temperature: float) -> None:
        self.batches += 1
        self.largest = max(self.largest, len(batch))
        results: Sequence[list[Choice] | Exception]
        try:
            results = self._answer(batch, max_new_tokens, temperature)
        except Exception as err:  # the server keeps serving; each request of the batch gets a 500
            results = [err] * len(batch)
        for job, result in zip(batch, results):
            with contextlib.suppress(InvalidStateError):  # its request already gave up
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _answer(self, group: list[Job], max_new_tokens: int, temperature: float) -> list[list[Choice]]:
        """Each job's choices from one `generate_encoded` call: a row per sampled choice (keyed sampling), one row
        for a greedy job's choices; each row's tokens handed to its `Choice` as they come (`RowFeed`)."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        vocabulary = Vocabulary(self.model)
        rows, choices = job_rows(group, vocabulary)
        if self.engine is not None:
            answer_with_engine(self.engine, group, rows, vocabulary, max_new_tokens, temperature)
            return choices
        recorder = StepLogprobs() if any(job.options.top_logprobs is not None for job in group) else None
        feed = RowFeed(rows, vocabulary, recorder)
        processors = [p for p in (recorder, keyed_sampler(group, temperature)) if p is not None]
        extra = {"logits_processor": LogitsProcessorList(processors)} if processors else {}
        items = [job.item for job in group for _ in range(job.rows)]
        images = [image for job in group for _ in range(job.rows) for image in job.images]
        self.model.generate_encoded(items, images, max_new_tokens, stopping_criteria=StoppingCriteriaList([feed]),
                                    **extra)
        feed.finish()
        return choices


def answer_with_engine(engine, group: list[Job], rows: list[Row], vocabulary: Vocabulary, max_new_tokens: int,
                       temperature: float) -> None:
    """The batch through vLLM (`engine: vllm`): one request per job with its own n (sampled rows), seed, top_p and
    top log-probabilities, the memory computed by the model as on the transformers path; each row's tokens then
    handed to its choice in order (a stream gets them once the batch is generated, not token by token). vLLM's
    sampled draws are its own (seeded per request), not the keyed sampler's; greedy answers equal transformers'."""
    params = [engine.sampling(max_new_tokens, job.rows, temperature, job.options.seed if temperature > 0 else None,
                              top_p=job.options.top_p if temperature > 0 else 1.0,
                              logprobs=job.options.top_logprobs is not None,
                              top_logprobs=job.options.top_logprobs or 0) for job in group]
    outputs = engine.generate([job.images for job in group], [job.question for job in group], max_new_tokens,
                              params=params, systems=[job.system for job in group])
    completions = [completion for request in outputs for completion in request]
    for row, completion in zip(rows, completions):
        for step, token in enumerate(completion.token_ids):
            if row.choice.done:
                break
            if row.cancelled():
                row.choice.finish_reason = "cancelled"
                break
            entry = None
            if row.choice.top_logprobs is not None and completion.logprobs is not None and completion.top:
                entry = vocabulary.entry(token, completion.logprobs[step])
                entry["top_logprobs"] = [vocabulary.entry(t, v) for t, v in completion.top[step]
                                         [:row.choice.top_logprobs] if math.isfinite(v)]
            RowFeed.tell(row, row.choice.push(token, entry))
        if not row.choice.done:
            RowFeed.tell(row, row.choice.finish("length"))


def job_rows(group: list[Job], vocabulary: Vocabulary) -> tuple[list[Row], list[list[Choice]]]:
    """The batch's rows in order, and each job's choices (a greedy job's n choices are its one row's)."""
    rows, choices = [], []
    for job in group:
        made = [Choice(vocabulary, job.options.stop, job.options.top_logprobs) for _ in range(job.rows)]
        for number, choice in enumerate(made):
            # (mypy cannot infer a lambda whose default argument binds the loop variable: "Cannot infer type")
            rows.append(Row(choice, _listener(job, number), lambda job=job: job.cancelled))  # type: ignore[misc]
        choices.append(made if job.rows == job.options.n else made * job.options.n)
    return rows, choices


def _listener(job: Job, row: int) -> Callable[[Delta], None] | None:
    """Tells the job's stream of its row's deltas: as its choice `row`, or as every choice of a greedy job."""
    if job.listen is None:
        return None
    numbers = [row] if job.rows == job.options.n else list(range(job.options.n))
    listen = job.listen

    def tell(delta: Delta) -> None:
        for number in numbers:
            listen(number, delta)

    return tell


def keyed_sampler(group: list[Job], temperature: float):
    """Sampling keyed per row by (seed, choice index) at the batch's temperature and top_p; None when greedy."""
    from medsynapse.model.sampling import KeyedSampler

    if temperature <= 0:
        return None
    keys = torch.tensor([choice_key(job.options.seed, number) for job in group for number in range(job.rows)],
                        dtype=torch.long)
    return KeyedSampler(keys, temperature, group[0].options.top_p)


# --- the app -----------------------------------------------------------------------------------------------------


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 as soon as it is known to be, never read
    whole: from Content-Length before any byte is read, or, for a chunked body (no length given), while it streams
    in; a chunked body within the limit is then handed on as read."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:  # the server reads no more than the declared length
            if declared.isdigit() and int(declared) > self.limit:
                return await self._refuse(send)
            return await self.app(scope, receive, send)
        first = await self._read_up_to_limit(receive)
        if first is None:
            return await self._refuse(send)
        return await self.app(scope, _replay(first, receive), send)

    async def _read_up_to_limit(self, receive) -> dict | None:
        """The whole chunked body as one message, or None once it passes the limit (what is left stays unread)."""
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: the app sees it
                return message
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return None
            if not message.get("more_body"):
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

    async def _refuse(self, send):
        import json

        body = json.dumps(error_body(413, f"request body larger than {self.limit} bytes (--max-body-mb)",
                                     "body_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _replay(first: dict, receive):
    """An ASGI `receive` that gives `first` once, then what `receive` gives (a disconnect)."""
    pending = [first]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


def validation_error(errors: list[dict]) -> tuple[str, str | None, str | None]:
    """(message, param, code) for FastAPI's validation errors: each error's field path and pydantic's message, never
    the input it was given (pydantic's `input`). A field of several types (`content`: a string or a list of parts) is
    named by its path alone, and the type the value failed deepest in speaks for it (`...image_url.detail`, not
    `content.str`)."""
    params: list[str | None]
    described, params, codes = [], [], []
    for error in _deepest(errors):
        location = _field_path(error)
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "")
            described.append(f"the body is not valid JSON ({reason} at character {location[0] if location else 0})")
            params.append(None)
            codes.append(error.get("type"))
            continue
        path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location).lstrip(".")
        line = f"{path or 'the body'}: {error.get('msg', 'invalid')}"
        if line not in described:
            described.append(line)
            params.append(path or None)
            codes.append(error.get("type"))
    return "; ".join(described) or "invalid request", params[0] if params else None, codes[0] if codes else None


UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}  # how pydantic names a union's member in `loc`


def _field_path(error: dict) -> tuple:
    """An error's location without `body` and without the union members pydantic names in it (`str`,
    `list[ContentPart]`)."""
    return tuple(part for part in error.get("loc", ()) if part != "body" and not (
        isinstance(part, str) and (part in UNION_TAGS or "[" in part)))


def _deepest(errors: list[dict]) -> list[dict]:
    """The errors whose field path no other error's extends: a union member that failed at the field itself gives
    way to one that failed inside it."""
    paths = [_field_path(error) for error in errors]
    return [error for error, path in zip(errors, paths)
            if not any(len(other) > len(path) and other[:len(path)] == path for other in paths)]


def create_app(model_dir: str, settings: ServeSettings | None = None, model=None, bases: BaseFolders | None = None):
    """The FastAPI app serving `model_dir` (or an already loaded `model`); the batcher starts with it. `bases`: the
    folder's base VLM / encoder given explicitly (model/bases.py)."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from fastapi.sse import EventSourceResponse
    from starlette.exceptions import HTTPException

    from medsynapse.answers import format_prompt
    from medsynapse.engines import check_engine
    from medsynapse.model.medsynapse import MedSynapseV

    settings = settings or ServeSettings()
    check_engine(settings.engine)  # before the model is loaded
    model = model or MedSynapseV.from_pretrained(model_dir, merge_adapter=True, bases=bases)
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")
    if model.max_images is not None and settings.max_images > model.max_images:  # a request past the memory's
        settings = replace(settings, max_images=model.max_images)  # limit is a 413, not a batch's 500
    name = Path(model_dir).name
    kind = "encoder" if model.sampler is not None else "autonomous" if model.autonomous is not None else "none"
    context = context_length(model)
    engine = None
    if settings.engine != "hf":
        engine, context = start_engine(model, settings, context)
    batcher = Batcher(model, settings, engine)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.stop()
        if engine is not None:
            engine.close()

    app = FastAPI(title="MedSynapse", version="1", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, err: BadRequest):
        return JSONResponse(error_body(err.status, str(err), err.code, err.param), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):  # OpenAI answers a bad schema with 400
        message, param, code = validation_error(list(err.errors()))
        return JSONResponse(error_body(400, message, code, param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):  # unknown routes, wrong methods
        message, code = route_error(err)
        return JSONResponse(error_body(err.status_code, message, code), status_code=err.status_code,
                            headers=err.headers)

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception):  # the server's fault: its name, not its details
        return JSONResponse(error_body(500, f"the server failed to answer ({type(err).__name__})"), status_code=500)

    @app.get("/health")
    def health():
        body = {"status": "ok" if batcher.alive else "batcher stopped", "model": name, "memory": kind,
                "queued": batcher.jobs.qsize(), "batches": batcher.batches, "largest_batch": batcher.largest}
        return body if batcher.alive else JSONResponse(body, status_code=503)

    card = {"id": name, "object": "model", "created": created_time(model_dir), "owned_by": "medsynapse",
            "memory": kind, "answer_format": model.answer_format}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    def model_card(model_id: str) -> dict:
        if model_id != name:
            raise BadRequest.at("model", 404, f"{model_id!r} is not served here; GET /v1/models lists {name!r}",
                                "model_not_found")
        return card

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: ChatRequest):
        deadline = time.monotonic() + settings.timeout_s
        if request.model not in (None, name):
            raise BadRequest.at("model", 404, f"{request.model!r} is not served here; GET /v1/models lists {name!r}",
                                "model_not_found")
        refuse_unsupported(request)
        max_new_tokens = max_new_tokens_of(request, settings)
        options = options_of(request, settings)

        def prepare() -> Job:
            parsed = parse_request(request, settings)
            question = format_prompt(parsed.question, model.answer_format)  # as `predict` asks it
            item = encode_prompt(model, parsed, question)
            check_prompt_length(len(item.input_ids), max_new_tokens, context)
            return Job(item, list(parsed.images), max_new_tokens, request.temperature or 0.0, len(item.input_ids),
                       options=options, question=question, system=parsed.system)

        try:  # a decode past the deadline is left to finish in its thread; the request is answered now
            job = await asyncio.wait_for(anyio.to_thread.run_sync(prepare, abandon_on_cancel=True),
                                         timeout=settings.timeout_s)
        except TimeoutError:
            raise BadRequest(504, f"no answer within {settings.timeout_s} s (still decoding the images)",
                             "timeout") from None
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if not request.stream:
            choices = await answer(batcher.submit(job), job, deadline, settings.timeout_s)
            return completion_body(head, choices, job.prompt_tokens, options.top_logprobs is not None)
        events = Events(asyncio.get_running_loop())
        job.listen = lambda number, delta: events.put((number, delta))
        job.future.add_done_callback(lambda _: events.put(DONE))
        batcher.submit(job)
        first = await first_event(events, job, deadline, settings.timeout_s)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return EventSourceResponse(stream_chunks(Stream(head, job, events, deadline, settings.timeout_s,
                                                        include_usage), first),
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return BodyLimit(app, settings.max_body_bytes)


# --- answers: whole, or streamed as server-sent events ----------------------------------------------------------


def created_time(model_dir: str) -> int:
    """When the served folder was written (a model's `created`); now, for a model given without a folder."""
    with contextlib.suppress(OSError):
        return int(Path(model_dir).stat().st_mtime)
    return int(time.time())


async def answer(future: Future, job: Job, deadline: float, timeout_s: float) -> list[Choice]:
    """The job's choices, or a 504 once the deadline passes (the job is then dropped from its batch)."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout=max(deadline - time.monotonic(), 0))
    except TimeoutError:
        job.cancelled = True
        raise BadRequest(504, f"no answer within {timeout_s} s", "timeout") from None


def usage_of(prompt_tokens: int, choices: list[Choice]) -> dict:
    """OpenAI's usage: the prompt once, the completion tokens of every choice."""
    completion = sum(choice.completion_tokens for choice in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def completion_body(head: dict, choices: list[Choice], prompt_tokens: int, logprobs: bool) -> dict:
    """A whole `chat.completion`."""
    return {"id": head["id"], "object": "chat.completion", "created": head["created"], "model": head["model"],
            "choices": [{"index": number, "message": {"role": "assistant", "content": choice.text},
                         "logprobs": {"content": choice.logprobs} if logprobs else None,
                         "finish_reason": choice.finish_reason} for number, choice in enumerate(choices)],
            "usage": usage_of(prompt_tokens, choices)}


DONE = object()  # the last of a stream's events: the job's future is done


class Events:
    """A streamed job's (choice index, delta) pairs, handed from the batcher thread to the request's event loop in
    order, DONE after the last."""

    queue: asyncio.Queue[Any]  # (choice index, Delta) pairs, then DONE

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, item) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (the server stopped): nobody listens
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def get(self, deadline: float):
        """The next event; TimeoutError once the deadline passes."""
        if not self.queue.empty():
            return self.queue.get_nowait()
        return await asyncio.wait_for(self.queue.get(), timeout=max(deadline - time.monotonic(), 0))


async def first_event(events: Events, job: Job, deadline: float, timeout_s: float):
    """A stream's first event, awaited before its 200 is sent: a late or failed batch is still a JSON error."""
    try:
        first = await events.get(deadline)
    except TimeoutError:
        job.cancelled = True
        raise BadRequest(504, f"no answer within {timeout_s} s", "timeout") from None
    if first is DONE:
        job.future.result()  # the batch failed: its exception is the 500
    return first


@dataclass
class Stream:
    """What a streamed answer's events are made of."""

    head: dict
    job: Job
    events: Events
    deadline: float
    timeout_s: float
    include_usage: bool

    def chunk(self, choices: list[dict], **extra) -> bytes:
        body = {"id": self.head["id"], "object": "chat.completion.chunk", "created": self.head["created"],
                "model": self.head["model"], "choices": choices}
        return sse({**body, **({"usage": None} if self.include_usage else {}), **extra})

    def delta_chunks(self, number: int, delta: Delta) -> list[bytes]:
        """A delta's content chunk (with its logprobs), and its finish chunk when it ends the choice."""
        out = []
        if delta.text or delta.logprobs:
            logprobs = {"content": delta.logprobs} if self.job.options.top_logprobs is not None else None
            out.append(self.chunk([{"index": number, "delta": {"content": delta.text}, "logprobs": logprobs,
                                    "finish_reason": None}]))
        if delta.finish_reason is not None:
            out.append(self.chunk([{"index": number, "delta": {}, "logprobs": None,
                                    "finish_reason": delta.finish_reason}]))
        return out


def sse(body: dict | str) -> bytes:
    from fastapi.sse import format_sse_event

    return format_sse_event(data_str=body if isinstance(body, str) else json.dumps(body))


async def stream_chunks(stream: Stream, first) -> AsyncIterator[bytes]:
    """A streamed answer: each choice's role chunk, its content chunks as its tokens settle, its finish chunk, the
    usage chunk when asked for, `[DONE]`. A failure or the deadline mid-stream is one error event and no `[DONE]`;
    a client that leaves drops its rows from the batch."""
    try:
        for number in range(stream.job.options.n):
            yield stream.chunk([{"index": number, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}])
        event = first
        while event is not DONE:
            for chunk in stream.delta_chunks(*event):
                yield chunk
            event = await stream.events.get(stream.deadline)
        choices = stream.job.future.result()
        if stream.include_usage:
            yield stream.chunk([], usage=usage_of(stream.job.prompt_tokens, choices))
        yield sse("[DONE]")
    except TimeoutError:
        yield sse(error_body(504, f"no answer within {stream.timeout_s} s", "timeout"))
    except Exception as err:  # the server's fault: its name, not its details
        yield sse(error_body(500, f"the server failed to answer ({type(err).__name__})"))
    finally:
        stream.job.cancelled = True  # a client gone mid-answer: its rows stop at the next token


def context_length(model) -> int | None:
    """The VLM's context in tokens (its text model's `max_position_embeddings`), None when its config has none."""
    from medsynapse.model.vlm import core_vlm

    config = core_vlm(model.vlm).config
    part: Any  # a config, or None (read through getattr)
    for part in (getattr(config, "text_config", None), config):
        if getattr(part, "max_position_embeddings", None):
            return int(part.max_position_embeddings)
    return None


def start_engine(model, settings: ServeSettings, context: int | None):
    """`engine: vllm`: a VLLMEngine over the model (exported to a temporary folder, removed when the server stops)
    with room for `max_images` images, and the context the server then checks prompts against (the smaller of the
    model's and `vllm_context`)."""
    from medsynapse.engines.vllm_engine import VLLMEngine  # .venv-vllm only (create_app's check_engine said so)

    length = min(context or settings.vllm_context, settings.vllm_context)
    engine = VLLMEngine(model, Path(tempfile.mkdtemp(prefix="medsynapse-serve-vllm-")) / "model",
                        max_images=settings.max_images, max_model_len=length)
    return engine, length


def encode_prompt(model, parsed: Parsed, question: str):
    """The request's prompt as the model's processor encodes it; an image the processor refuses (e.g. an aspect
    ratio of 200:1 or more) is a 400 naming its part, found by offering the processor each image alone."""
    try:
        return model.prompts.encode(parsed.images, question, system=parsed.system)
    except ValueError:
        for image, where in zip(parsed.images, parsed.wheres):
            try:
                model.processor.image_processor(images=[image])
            except ValueError as reason:
                raise BadRequest.at(f"{where}.image_url", 400, f"the model's image processor refuses this "
                                    f"{image.width}x{image.height} image: {reason}", "invalid_image") from None
        raise


def check_prompt_length(prompt_tokens: int, max_new_tokens: int, context: int | None) -> None:
    """A prompt that leaves fewer than `max_new_tokens` of the model's context is a 413 naming both numbers."""
    if context is not None and prompt_tokens > context - max_new_tokens:
        raise BadRequest.at("messages", 413, f"the prompt is {prompt_tokens} tokens (text, image and memory "
                                             f"tokens), more than {context - max_new_tokens}: the model's context of "
                                             f"{context} tokens less max_tokens {max_new_tokens}",
                            "context_length_exceeded")


def route_error(err) -> tuple[str, str | None]:
    """(message, code) for Starlette's own refusals: no such route (404), a method the route does not take (405)."""
    routes = "POST /v1/chat/completions, GET /v1/models, GET /v1/models/{id}, GET /health"
    if err.status_code == 404:
        return f"Invalid URL: no such route; this server serves {routes}", "unknown_url"
    if err.status_code == 405:
        allowed = (err.headers or {}).get("Allow", "")
        return f"method not allowed on this route (it takes {allowed}); this server serves {routes}", \
            "method_not_allowed"
    return str(err.detail), None


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings | None = None,
          bases: BaseFolders | None = None) -> None:
    import uvicorn

    app = create_app(model_dir, settings, bases=bases)
    print(f"serving {model_dir} on http://{host}:{port}/v1 (batch <= {(settings or ServeSettings()).max_batch})",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
