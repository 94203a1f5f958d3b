"""`medsynapse serve --model DIR`: an OpenAI-compatible chat-completions server with dynamic batching.

Endpoints: `POST /v1/chat/completions` (messages whose content holds text and `image_url` parts: `data:` URIs of
PNG / JPEG / DICOM, or local paths under an `--allow-dir`; `max_tokens`, `temperature`), `GET /v1/models`,
`GET /health`. Plan of a request:
1. FastAPI checks the schema (422 naming the field); the body is refused past `max_body_bytes` (413) before it is
   read whole;
2. in a worker thread: the images are decoded by the same loader as training and evaluation (data/images.py: DICOM
   windowed), checked against `max_pixels` (413), and the prompt is encoded as `predict` does (the model's answer
   format); a bad image is a 400 naming the message and part;
3. the encoded request joins a bounded queue (503 when full) and waits for its answer at most `timeout_s` (504);
4. one batcher thread takes the first waiting request and every other that arrives within `max_wait_ms`, up to
   `max_batch`, groups them by generation settings, and runs each group through `MedSynapseV.generate_encoded`, the
   path `answer` and the benchmark harness use (left-padded batch, greedy unless a temperature is asked for), so a
   batched answer is the answer the request would get alone.
The model package knows nothing of HTTP: this module only parses, queues and formats. Binds 127.0.0.1 by default.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import os
import queue
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from medsynapse.model.bases import BaseFolders

MIME_SUFFIXES = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "application/dicom": ".dcm",
                 "image/dicom": ".dcm", "application/x-nifti": ".nii", "application/gzip": ".nii.gz",
                 "application/x-nifti-gz": ".nii.gz"}  # gzip: a compressed NIfTI volume


@dataclass
class ServeSettings:
    max_batch: int = 16
    max_wait_ms: float = 10.0
    max_queue: int = 256
    max_new_tokens: int = 64  # the default and the largest `max_tokens` a request may ask for
    max_pixels: int = 4096 * 4096
    max_body_bytes: int = 32 * 2**20
    max_images: int = 4
    timeout_s: float = 120.0
    allow_dirs: list[str] = field(default_factory=list)  # local image paths are read only under these folders


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --- the OpenAI request schema -----------------------------------------------------------------------------------


class ImageURL(BaseModel):
    url: str


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)


# --- parsing ---------------------------------------------------------------------------------------------------


@dataclass
class Parsed:
    question: str
    system: str
    images: list  # PIL images


def parse_request(request: ChatRequest, settings: ServeSettings) -> Parsed:
    """The last user message's text and images, the system message; every problem a BadRequest naming it."""
    system = " ".join(_text(m.content) for m in request.messages if m.role == "system").strip()
    users = [i for i, m in enumerate(request.messages) if m.role == "user"]
    if not users:
        raise BadRequest(400, "messages: no message with role 'user'")
    index = users[-1]
    content = request.messages[index].content
    parts = [ContentPart(type="text", text=content)] if isinstance(content, str) else content
    count = sum(part.type == "image_url" for part in parts)
    if count > settings.max_images:  # before any image is decoded
        raise BadRequest(413, f"messages[{index}]: {count} images, at most {settings.max_images}")
    texts, images = [], []
    for number, part in enumerate(parts):
        where = f"messages[{index}].content[{number}]"
        if part.type == "text":
            if part.text is None:
                raise BadRequest(400, f"{where}: a text part needs 'text'")
            texts.append(part.text)
        else:
            if part.image_url is None:
                raise BadRequest(400, f"{where}: an image_url part needs 'image_url': {{'url': ...}}")
            images.append(load_request_image(part.image_url.url, where, settings))
    question = " ".join(t.strip() for t in texts).strip()
    if not question:
        raise BadRequest(400, f"messages[{index}]: no question text")
    if not images:
        raise BadRequest(400, f"messages[{index}]: no image (an image_url part with a data: URI or an allowed path)")
    return Parsed(question, system, images)


def _text(content: str | list[ContentPart]) -> str:
    return content if isinstance(content, str) else " ".join(p.text or "" for p in content if p.type == "text")


def load_request_image(url: str, where: str, settings: ServeSettings):
    """A `data:` URI (PNG, JPEG, DICOM, NIfTI) or an allowed local path, opened by the project's image loader. A NIfTI
    volume's view follows a '#' (`...#axis=coronal&slice=40&window=40,400`; default the middle axial slice)."""
    from medsynapse.data.images import is_nifti, load_image, split_view
    from medsynapse.data.schema import DataError

    if url.startswith("data:"):
        url, _, fragment = url.partition("#")  # base64 has no '#': what follows is a volume's view
        header, sep, payload = url.partition(",")
        mime = header[5:].split(";")[0].lower()
        if not sep or ";base64" not in header:
            raise BadRequest(400, f"{where}.image_url: expected data:<type>;base64,<data>")
        if mime not in MIME_SUFFIXES:
            raise BadRequest(415, f"{where}.image_url: type {mime!r} is not served; one of {sorted(MIME_SUFFIXES)}")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(400, f"{where}.image_url: not valid base64") from None
        if fragment and not MIME_SUFFIXES[mime].startswith(".nii"):
            raise BadRequest(400, f"{where}.image_url: a view after '#' applies to NIfTI volumes, not {mime!r}")
        if mime.startswith("image/") and MIME_SUFFIXES[mime] in (".png", ".jpg"):  # decoded in memory
            picture = _picture_from_bytes(data, where, settings)
            if picture is not None:
                return picture
        handle, path = tempfile.mkstemp(suffix=MIME_SUFFIXES[mime])
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            _check_size(path, where, settings)
            image = _open(load_image, f"{path}#{fragment}" if fragment else path, where, DataError)
        finally:
            os.unlink(path)
    else:
        file, fragment = split_view(url.removeprefix("file://"))
        path = Path(file).expanduser().resolve()
        if not any(path.is_relative_to(Path(d).expanduser().resolve()) for d in settings.allow_dirs):
            raise BadRequest(403, f"{where}.image_url: local paths are read only under --allow-dir "
                                  f"({settings.allow_dirs or 'none given'}); send a data: URI")
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
        raise BadRequest(400, f"{where}.image_url: {err}") from None


def _check_size(path: str, where: str, settings: ServeSettings) -> None:
    """Width x height from the file's header (PNG/JPEG via PIL's lazy open, DICOM's Rows/Columns), refused past
    `max_pixels` before any pixel is decoded (a small compressed file can decode to gigabytes)."""

    from medsynapse.data.images import is_nifti

    size = None
    if is_nifti(path):  # a volume: its largest plane, from the header
        try:
            import nibabel as nib

            dims = sorted(int(n) for n in nib.load(path).shape[:3])
            size = (dims[-1], dims[-2] if len(dims) > 1 else 1)
        except Exception:  # not a volume: the loader names what is wrong
            return
    else:
        size = _picture_size(path)
    if size is not None:
        _refuse_past_max_pixels(size, where, settings)


def _refuse_past_max_pixels(size: tuple[int, int], where: str, settings: ServeSettings) -> None:
    if size[0] * size[1] > settings.max_pixels:
        raise BadRequest(413, f"{where}.image_url: {size[0]}x{size[1]} = {size[0] * size[1]} pixels, more than "
                              f"--max-pixels {settings.max_pixels}")


def _picture_size(path: str) -> tuple[int, int] | None:
    from PIL import Image, UnidentifiedImageError

    size = None
    try:
        with Image.open(path) as image:
            size = image.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        try:
            import pydicom

            header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            size = (int(header.Columns), int(header.Rows))
        except Exception:  # not an image: the loader names what is wrong
            return None
    return size


def _open(load_image, path: str, where: str, data_error: type):
    try:
        return load_image(path)
    except data_error as err:  # the server's own file names (a temporary upload) are not the client's business
        from medsynapse.data.images import split_view

        message = str(err).replace(path, "the image").replace(split_view(path)[0], "the image")
        raise BadRequest(400, f"{where}.image_url: {message}") from None


# --- batching ----------------------------------------------------------------------------------------------------


@dataclass
class Job:
    item: object  # EncodedPrompt
    images: list  # every image of the request (the memory is built from all of them)
    max_new_tokens: int
    temperature: float
    future: Future = field(default_factory=Future)
    cancelled: bool = False


class Batcher:
    """One thread that answers queued jobs in dynamic batches through the model's one generation path."""

    def __init__(self, model, settings: ServeSettings):
        self.model, self.settings = model, settings
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
            raise BadRequest(503, f"queue full ({self.settings.max_queue} requests waiting); retry later") from None
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
            groups: dict[tuple[int, float], list[Job]] = {}
            for job in self._take():
                groups.setdefault((job.max_new_tokens, job.temperature), []).append(job)
            for (max_new_tokens, temperature), group in groups.items():
                self.batches += 1
                self.largest = max(self.largest, len(group))
                try:
                    results = self._answer(group, max_new_tokens, temperature)
                except Exception as err:  # the server keeps serving; each request of the group gets a 500
                    results = [err] * len(group)
                for job, result in zip(group, results):
                    with contextlib.suppress(InvalidStateError):  # its request already gave up
                        if isinstance(result, Exception):
                            job.future.set_exception(result)
                        else:
                            job.future.set_result(result)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _answer(self, group: list[Job], max_new_tokens: int, temperature: float) -> list[dict]:
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
        images = [img for j in group for img in j.images]
        tokens = self.model.generate_encoded([j.item for j in group], images, max_new_tokens, **sampling)
        tokenizer, eos = self.model.processor.tokenizer, self.model.prompts.eos_id
        out = []
        for row in tokens.tolist():
            ended = eos in row
            used = row[: row.index(eos) + 1] if ended else row
            out.append({"text": tokenizer.decode(used, skip_special_tokens=True).strip(),
                        "completion_tokens": len(used), "finish_reason": "stop" if ended else "length"})
        return out


# --- the app -----------------------------------------------------------------------------------------------------


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 as soon as it is known to be (from
    Content-Length, or while a chunked body streams in), never read whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BadRequest(413, "body too large")
            return message

        try:
            return await self.app(scope, limited, send)
        except BadRequest:
            return await self._refuse(send)

    async def _refuse(self, send):
        import json

        body = json.dumps({"error": {"message": f"request body larger than {self.limit} bytes", "type":
                                     "invalid_request_error", "code": 413}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def create_app(model_dir: str, settings: ServeSettings | None = None, model=None, bases: BaseFolders | None = None):
    """The FastAPI app serving `model_dir` (or an already loaded `model`); the batcher starts with it. `bases`: the
    folder's base VLM / encoder given explicitly (model/bases.py)."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    from medsynapse.model.medsynapse import MedSynapseV
    from medsynapse.objectives.answers import format_prompt

    settings = settings or ServeSettings()
    model = model or MedSynapseV.from_pretrained(model_dir, merge_adapter=True, bases=bases)
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")
    if model.max_images is not None and settings.max_images > model.max_images:  # a request past the memory's
        settings = replace(settings, max_images=model.max_images)  # limit is a 413, not a batch's 500
    name = Path(model_dir).name
    kind = "encoder" if model.sampler is not None else "autonomous" if model.autonomous is not None else "none"
    batcher = Batcher(model, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.stop()

    app = FastAPI(title="MedSynapse", version="1", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, err: BadRequest):
        error = "server_busy" if err.status == 503 else "timeout" if err.status == 504 else "invalid_request_error"
        return JSONResponse({"error": {"message": str(err), "type": error, "code": err.status}},
                            status_code=err.status)

    @app.get("/health")
    def health():
        body = {"status": "ok" if batcher.alive else "batcher stopped", "model": name, "memory": kind,
                "queued": batcher.jobs.qsize(), "batches": batcher.batches, "largest_batch": batcher.largest}
        return body if batcher.alive else JSONResponse(body, status_code=503)

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "medsynapse",
                                            "memory": kind, "answer_format": model.answer_format}]}

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest) -> dict:
        if request.model not in (None, name):
            raise BadRequest(404, f"model {request.model!r} is not served here; GET /v1/models lists {name!r}")
        max_new_tokens = request.max_tokens or settings.max_new_tokens
        if max_new_tokens > settings.max_new_tokens:
            raise BadRequest(400, f"max_tokens {max_new_tokens} is over this server's limit {settings.max_new_tokens}")

        def prepare() -> Job:
            parsed = parse_request(request, settings)
            question = format_prompt(parsed.question, model.answer_format)  # as `predict` asks it
            item = model.prompts.encode(parsed.images, question, system=parsed.system)
            return Job(item, list(parsed.images), max_new_tokens, request.temperature)

        job = await run_in_threadpool(prepare)
        future = batcher.submit(job)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), timeout=settings.timeout_s)
        except TimeoutError:
            job.cancelled = True
            raise BadRequest(504, f"no answer within {settings.timeout_s} s") from None
        prompt_tokens = len(job.item.input_ids)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": name, "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                                            "finish_reason": result["finish_reason"]}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": result["completion_tokens"],
                          "total_tokens": prompt_tokens + result["completion_tokens"]}}

    return BodyLimit(app, settings.max_body_bytes)


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings | None = None,
          bases: BaseFolders | None = None) -> None:
    import uvicorn

    app = create_app(model_dir, settings, bases=bases)
    print(f"serving {model_dir} on http://{host}:{port}/v1 (batch <= {(settings or ServeSettings()).max_batch})",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
