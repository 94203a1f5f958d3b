"""`medsynapse serve`: 32 concurrent requests (PNG, JPEG, DICOM mixed) against a real server process, each answered as
it would be alone; every bad input (a prompt past the context, an image the processor refuses, a schema error, an
unknown route, a chunked body past the limit, a decompression bomb) gets its 4xx in OpenAI's error shape and the
server keeps serving; the encoder-free student is served the same way; prompts are batched by length; a full queue
is a 503, a late answer or a slow decode a 504."""

from __future__ import annotations

import base64
import gzip
import io
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import write_dicom
from PIL import Image
from serving import CLI, free_port, served, spawn, tail

from medsynapse.answers import format_prompt
from medsynapse.data.images import load_image
from medsynapse.data.schema import read_samples
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.vlm import core_vlm
from medsynapse.serve import BadRequest, Batcher, Job, ServeSettings, create_app, pack

pytestmark = pytest.mark.slow

MIME = {".png": "image/png", ".jpg": "image/jpeg", ".dcm": "application/dicom"}
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def folders(tiny_env, tmp_path_factory):
    from medsynapse.recipes.stage1_warmup import Stage1Config, train_stage1
    from medsynapse.recipes.stage2_ccr import Stage2Config, train_stage2
    from medsynapse.recipes.stage3_imt import Stage3Config, train_stage3

    root = tmp_path_factory.mktemp("serve")
    train_stage1(Stage1Config(vlm=str(tiny_env.vlm), encoder=str(tiny_env.encoder), train_file=str(tiny_env.train_file),
                              output_dir=str(root / "s1"), n_memory=4, sampler_width=32, batch_size=4, max_steps=2))
    train_stage2(Stage2Config(model=str(root / "s1"), train_file=str(tiny_env.train_file), output_dir=str(root / "s2"),
                              lora_r=4, lora_alpha=8, group_size=2, batch_size=2, max_steps=2, max_new_tokens=3))
    train_stage3(Stage3Config(model=str(root / "s2"), train_file=str(tiny_env.train_file),
                              output_dir=str(root / "s3"), batch_size=2, max_steps=2, max_new_tokens=3))
    return root / "s2", root / "s3"


@pytest.fixture(scope="module")
def teacher_model(folders) -> MedSynapseV:
    """The Stage II teacher, loaded once: the answers a request gets alone, and the model of the in-process apps."""
    return MedSynapseV.from_pretrained(folders[0], merge_adapter=True)


@pytest.fixture(scope="module")
def requests(tiny_env, tmp_path_factory) -> list[tuple[Path, str]]:
    """32 (image file, question) pairs: the test split's PNGs, and JPEG and DICOM copies of them."""
    folder = tmp_path_factory.mktemp("images")
    samples = [s for s in read_samples(tiny_env.test_file) if s.answer_type != "caption"]
    out = []
    for number in range(32):
        sample = samples[number % len(samples)]
        image = Image.open(sample.images[0]).convert("RGB")
        kind = (".png", ".jpg", ".dcm")[number % 3]
        path = folder / f"{number}{kind}"
        if kind == ".png":
            image.save(path)
        elif kind == ".jpg":
            image.save(path, quality=90)
        else:
            write_dicom(path, np.asarray(image.convert("L"), dtype=np.int16) * 4, window=(512, 1024))
        out.append((path, sample.question))
    return out


def _data_uri(path: Path) -> str:
    return f"data:{MIME[path.suffix]};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _body(path_or_uri: str, question: str, max_tokens: int = 6) -> dict:
    return {"model": None, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": path_or_uri}},
                                                      {"type": "text", "text": question}]}]}


def _alone(model: MedSynapseV, path: Path, question: str, max_new_tokens: int = 6) -> str:
    image = load_image(str(path))
    return model.answer([image], [format_prompt(question, model.answer_format)], max_new_tokens=max_new_tokens)[0]


def _png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (40, 40, 40)).save(buffer, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def _uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _gzip_nifti(extra_mib: int) -> tuple[int, bytes]:
    """(inflated size, file): an 8x8x4 NIfTI volume gzip'd, followed by `extra_mib` gzip members of 1 MiB of zeros
    each (about 1 KB apiece: a small upload that inflates to `extra_mib` MiB more; nibabel reads only the volume)."""
    import nibabel as nib

    raw = nib.Nifti1Image(np.arange(8 * 8 * 4, dtype=np.float32).reshape(8, 8, 4), np.eye(4)).to_bytes()
    return len(raw) + extra_mib * 2**20, gzip.compress(raw) + gzip.compress(b"\0" * 2**20, 9) * extra_mib


def _deflated_dicom(path: Path, extra_mib: int = 0) -> tuple[int, bytes]:
    """(inflated size, file): the DICOM at `path` rewritten with the Deflated transfer syntax, its dataset followed by
    a private OB element of `extra_mib` MiB of zeros (each MiB one deflate block of about 1 KB, so the file stays
    small however large the element)."""
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    def explicit_little() -> DicomBytesIO:
        out = DicomBytesIO()
        out.is_little_endian, out.is_implicit_VR = True, False
        return out

    ds = pydicom.dcmread(path)
    body, meta = explicit_little(), explicit_little()
    write_dataset(body, ds)
    extra = struct.pack("<HH2sHI", 0x7FE1, 0x1010, b"OB", 0, extra_mib * 2**20) if extra_mib else b""  # its header
    dataset = body.getvalue() + extra
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = deflate.compress(dataset) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(b"\0" * 2**20) + deflate.flush(zlib.Z_FULL_FLUSH) if extra_mib else b""  # state reset
    stream = head + block * extra_mib + deflate.flush()
    return len(dataset) + extra_mib * 2**20, b"\0" * 128 + b"DICM" + meta.getvalue() + stream


def _many_frames(path: Path, frames: int) -> bytes:
    """The DICOM at `path` with a header that claims `frames` frames (its pixel data unchanged)."""
    import pydicom

    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = frames
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _chunked(data: bytes, piece: int = 2**16):
    """A body httpx sends chunked (no Content-Length)."""
    return (data[i:i + piece] for i in range(0, len(data), piece))


def _error(reply: httpx.Response) -> dict:
    """The reply's OpenAI error object, checked to have exactly OpenAI's fields (nothing else, e.g. no `input`)."""
    assert reply.headers["content-type"] == "application/json", reply.text
    body = reply.json()
    assert list(body) == ["error"] and sorted(body["error"]) == ["code", "message", "param", "type"], reply.text
    return body["error"]


def test_served_answers_equal_one_at_a_time_and_bad_input_gets_its_4xx(folders, teacher_model, requests, tmp_path):
    teacher, _ = folders
    flags = ["--max-batch", "8", "--max-wait-ms", "200", "--max-pixels", str(100 * 100), "--max-body-mb", "1",
             "--allow-dir", str(requests[0][0].parent)]
    with served(teacher, tmp_path / "server.log", *flags) as base, httpx.Client(base_url=base, timeout=120) as client:
        models = client.get("/v1/models").json()["data"]
        assert models[0]["id"] == teacher.name and models[0]["memory"] == "encoder"

        with ThreadPoolExecutor(32) as pool:
            replies = list(pool.map(lambda r: client.post(CHAT, json=_body(_data_uri(r[0]), r[1])), requests))
        model = teacher_model
        expected = [_alone(model, path, question) for path, question in requests]
        assert [r.status_code for r in replies] == [200] * 32, replies[0].text
        got = [r.json()["choices"][0]["message"]["content"] for r in replies]
        assert got == expected  # each request its own answer, as if alone
        assert len(set(expected)) > 1  # the answers differ by request, so a mix-up would show
        usage = replies[0].json()["usage"]
        assert usage["completion_tokens"] >= 1 and usage["total_tokens"] > usage["prompt_tokens"]
        health = client.get("/health").json()
        assert health["batches"] < 32 and health["largest_batch"] > 1  # requests were batched

        good = _body(_data_uri(requests[0][0]), requests[0][1])
        dicom = requests[2][0]
        image = "messages[0].content[0].image_url"
        context = core_vlm(model.vlm).config.text_config.max_position_embeddings
        long_question = " ".join(["is there a lesion"] * 1200)
        long_tokens = len(model.prompts.encode([load_image(str(requests[0][0]))], format_prompt(
            long_question, model.answer_format)).input_ids)
        inflate_limit = 32 * 100 * 100  # 32 bytes per --max-pixels pixel
        bombs = {"gzip bomb": _uri("application/gzip", _gzip_nifti(512)[1]),
                 "deflate bomb": _uri("application/dicom", _deflated_dicom(dicom, 512)[1])}
        assert all(len(uri) < 2**20 for uri in bombs.values())  # within --max-body-mb: the inflating is refused
        chat = "POST", CHAT
        bad = {  # name: (method, path, httpx arguments), status, code, param, words in the message
            "not an image": ((*chat, {"json": _body(_uri("image/png", b"hello"), "q")}), 400, "invalid_image",
                             image, "corrupt or unreadable image"),
            "corrupt DICOM": ((*chat, {"json": _body(_uri("application/dicom", dicom.read_bytes()[:300]), "q")}),
                              400, "invalid_image", image, "DICOM"),
            "too many pixels": ((*chat, {"json": _body(_png(200, 200), "q")}), 413, "image_too_large", image,
                                "more than --max-pixels"),
            "wrong schema": ((*chat, {"json": {"messages": [{"role": "user"}]}}), 400, "missing",
                             "messages[0].content", "messages[0].content: Field required"),
            "no image": ((*chat, {"json": {"messages": [{"role": "user", "content": "is there a lesion?"}]}}), 400,
                         None, "messages[0]", "no image"),
            "not base64": ((*chat, {"json": _body("data:image/png;base64,@@@", "q")}), 400, None, image,
                           "base64"),
            "unsupported type": ((*chat, {"json": _body("data:image/gif;base64,R0lG", "q")}), 415,
                                 "unsupported_media_type", image, "image/gif"),
            "path not allowed": ((*chat, {"json": _body("/etc/hostname", "q")}), 403, "path_not_allowed", image,
                                 "--allow-dir"),
            "unknown model": ((*chat, {"json": {**good, "model": "gpt-4"}}), 404, "model_not_found", "model",
                              "not served"),
            "too many tokens": ((*chat, {"json": {**good, "max_tokens": 10_000}}), 400, None, "max_tokens",
                                "over this server's limit 64"),
            "body too large": ((*chat, {"json": _body("data:image/png;base64," + "A" * (2 * 2**20), "q")}), 413,
                               "body_too_large", None, "request body larger than 1048576 bytes (--max-body-mb)"),
            "prompt past the context": (
                (*chat, {"json": _body(_data_uri(requests[0][0]), long_question)}), 413, "context_length_exceeded",
                "messages", f"messages: the prompt is {long_tokens} tokens (text, image and memory tokens), more "
                            f"than {context - 6}: the model's context of {context} tokens less max_tokens 6"),
            "aspect ratio": ((*chat, {"json": _body(_png(3000, 2), "q")}), 400, "invalid_image", image,
                             f"{image}: the model's image processor refuses this 3000x2 image: absolute aspect "
                             "ratio must be smaller than 200"),
            "input not echoed": ((*chat, {"json": {"messages": [{"role": "doctor", "content": "SECRET-7310"}]}}),
                                 400, "literal_error", "messages[0].role", "messages[0].role: Input should be"),
            "malformed JSON": ((*chat, {"content": b'{"messages": [', "headers": {
                "content-type": "application/json"}}), 400, "json_invalid", None, "the body is not valid JSON"),
            "unknown route": (("GET", "/v1/nothing", {}), 404, "unknown_url", None, "Invalid URL: no such route"),
            "wrong method": (("GET", CHAT, {}), 405, "method_not_allowed", None, "it takes POST"),
            "chunked body too large": ((*chat, {"content": _chunked(b"x" * (2 * 2**20)), "headers": {
                "content-type": "application/json"}}), 413, "body_too_large", None,
                "request body larger than 1048576 bytes (--max-body-mb)"),
            **{name: ((*chat, {"json": _body(uri, "q")}), 413, "decoded_too_large", image,
                      f"{image}: the compressed data inflates to more than {inflate_limit} bytes "
                      "(--max-decoded-mb)") for name, uri in bombs.items()},
            "many frames": ((*chat, {"json": _body(_uri("application/dicom", _many_frames(dicom, 10**5)), "q")}),
                            413, "decoded_too_large", image, f"decodes to {10**5 * 64 * 64 * 2} bytes (every "
                                                             f"frame), more than {inflate_limit}"),
        }
        for name, ((method, path, arguments), status, code, param, words) in bad.items():
            started = time.monotonic()
            reply = client.request(method, path, **arguments)
            assert reply.status_code == status, (name, reply.text)
            error = _error(reply)
            assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param), name
            assert words in error["message"], (name, error["message"])
            assert "SECRET-7310" not in reply.text and "doctor" not in reply.text
            assert time.monotonic() - started < 10, name  # refused before anything is inflated or decoded whole
            after = client.post(CHAT, json=good)
            assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == expected[0]
        assert client.request("GET", CHAT).headers["allow"] == "POST"
        allowed = client.post(CHAT, json=_body(str(requests[1][0]), requests[1][1]))
        assert allowed.json()["choices"][0]["message"]["content"] == expected[1]  # a path under --allow-dir
        import json

        streamed = client.post(CHAT, content=_chunked(json.dumps(good).encode(), 1000),
                               headers={"content-type": "application/json"})
        assert streamed.json()["choices"][0]["message"]["content"] == expected[0]  # a chunked body within limits
        size, deflated = _deflated_dicom(dicom)
        assert size < inflate_limit
        small = client.post(CHAT, json=_body(_uri("application/dicom", deflated), requests[2][1]))
        assert small.json()["choices"][0]["message"]["content"] == expected[2]  # a Deflated DICOM within limits


def test_the_encoder_free_student_is_served_the_same_way(folders, requests):
    from fastapi.testclient import TestClient

    _, student = folders
    model = MedSynapseV.from_pretrained(student, merge_adapter=True)
    with TestClient(create_app(str(student), ServeSettings(max_batch=4, max_wait_ms=50))) as client:
        assert client.get("/v1/models").json()["data"][0]["memory"] == "autonomous"
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda r: client.post("/v1/chat/completions", json=_body(_data_uri(r[0]), r[1])),
                                    requests[:6]))
    assert [r.json()["choices"][0]["message"]["content"] for r in replies] == [
        _alone(model, path, question) for path, question in requests[:6]]


def test_inflated_sizes_are_counted_over_every_member_and_capped(requests, tmp_path):
    from medsynapse.data.images import TooLarge, check_inflated_size

    volume, dicom = tmp_path / "v.nii.gz", tmp_path / "d.dcm"
    volume_size, data = _gzip_nifti(3)
    volume.write_bytes(data)
    dicom_size, data = _deflated_dicom(requests[2][0], 2)
    dicom.write_bytes(data)
    for path, size in ((volume, volume_size), (dicom, dicom_size)):
        assert check_inflated_size(str(path), size) == size  # every gzip member, the whole deflate stream
        with pytest.raises(TooLarge, match=f"inflates to more than {size - 1} bytes"):
            check_inflated_size(str(path), size - 1)
    assert check_inflated_size(str(requests[2][0]), 1) is None  # an uncompressed DICOM: nothing inflates
    assert check_inflated_size(str(requests[0][0]), 1) is None  # a PNG: its pixels are bounded by --max-pixels


class _Recording(Batcher):
    """A batcher that records each batch's prompt lengths and answers at once (no model)."""

    def __init__(self, settings: ServeSettings):
        self.seen: list[list[int]] = []
        super().__init__(None, settings)

    def _answer(self, group, max_new_tokens, temperature):
        self.seen.append([job.prompt_tokens for job in group])
        return [{"text": job.item} for job in group]


def test_prompts_are_batched_by_length_within_max_batch_tokens():
    def jobs(*lengths: int) -> list[Job]:
        return [Job(f"job {n}", [], 4, 0.0, n) for n in lengths]

    def lengths(batches: list[list[Job]]) -> list[list[int]]:
        return [[job.prompt_tokens for job in batch] for batch in batches]

    assert lengths(pack(jobs(30, 4000, 31, 29, 32), 1000)) == [[29, 30, 31, 32], [4000]]  # the long one alone
    assert lengths(pack(jobs(*[30] * 5), 4 * (30 + 4))) == [[30] * 4, [30]]  # rows x (prompt + new tokens) <= bound
    assert lengths(pack(jobs(*[30] * 5), 4 * (30 + 4) - 1)) == [[30] * 3, [30] * 2]
    batcher = _Recording(ServeSettings(max_batch=8, max_wait_ms=500, max_batch_tokens=1000))
    try:
        futures = [batcher.submit(job) for job in jobs(30, 4000, 31, 29, 32)]
        assert [f.result(10)["text"] for f in futures] == ["job 30", "job 4000", "job 31", "job 29", "job 32"]
        assert batcher.seen == [[29, 30, 31, 32], [4000]] and batcher.largest == 4
    finally:
        batcher.stop()


def test_a_slow_decode_is_a_504_and_the_server_keeps_serving(teacher_model, requests, monkeypatch):
    """The images are decoded within --timeout: a decode that takes longer answers 504 at the deadline (its thread is
    left to finish), and the next request is answered."""
    from fastapi.testclient import TestClient

    import medsynapse.data.images as images

    release, load = threading.Event(), images.load_image

    def slow(path, *args, **kwargs):  # a DICOM decodes until released
        if str(path).endswith(".dcm"):
            release.wait(60)
        return load(path, *args, **kwargs)

    monkeypatch.setattr(images, "load_image", slow)
    (dicom, dicom_question), (png, question) = requests[2], requests[0]
    try:
        with TestClient(create_app("teacher", ServeSettings(timeout_s=3.0), model=teacher_model)) as client:
            started = time.monotonic()
            late = client.post(CHAT, json=_body(_data_uri(dicom), dicom_question))
            waited = time.monotonic() - started
            after = client.post(CHAT, json=_body(_data_uri(png), question))  # while the decode still hangs
            release.set()
    finally:
        release.set()
    assert late.status_code == 504 and _error(late) == {"message": "no answer within 3.0 s (still decoding the images)",
                                                         "type": "timeout", "param": None, "code": "timeout"}
    assert 3.0 <= waited < 20
    assert after.status_code == 200
    assert after.json()["choices"][0]["message"]["content"] == _alone(teacher_model, png, question)


class _Blocking:
    """A stand-in model whose generation waits until released (a busy server)."""

    def __init__(self):
        self.release = threading.Event()

    def generate_encoded(self, items, images, max_new_tokens, **kwargs):
        self.release.wait(10)
        raise RuntimeError("released")


class _Slow(Batcher):
    """A batcher whose answers take 0.3 s (no model): the request-side races without timing a real model."""

    def _answer(self, group, max_new_tokens, temperature):
        time.sleep(0.3)
        return [{"text": job.item} for job in group]


def test_the_batcher_survives_requests_that_give_up():
    batcher = _Slow(None, ServeSettings(max_batch=1, max_wait_ms=0))
    try:
        running = batcher.submit(Job("a", [], 4, 0.0))
        time.sleep(0.1)
        waiting = batcher.submit(Job("b", [], 4, 0.0))
        assert not running.cancel() and waiting.cancel()  # a 504 cancels what waits; what runs finishes
        later = batcher.submit(Job("c", [], 4, 0.0))
        assert running.result(5)["text"] == "a" and later.result(5)["text"] == "c"
        assert batcher.alive and batcher.batches == 2  # the cancelled job was skipped, the thread kept going
    finally:
        batcher.stop()


def test_a_full_queue_is_a_503_and_a_late_answer_a_504(teacher_model, requests):
    from fastapi.testclient import TestClient

    blocking = _Blocking()
    batcher = Batcher(blocking, ServeSettings(max_batch=1, max_queue=1, max_wait_ms=0))
    try:
        batcher.submit(Job("a", [], 4, 0.0))  # taken by the batcher, which then blocks
        time.sleep(0.3)
        batcher.submit(Job("b", [], 4, 0.0))  # waits in the queue (size 1)
        with pytest.raises(BadRequest, match="queue full") as refused:
            batcher.submit(Job("c", [], 4, 0.0))
        assert refused.value.status == 503
    finally:
        blocking.release.set()
        batcher.stop()
    with TestClient(create_app("teacher", ServeSettings(timeout_s=0.0001), model=teacher_model)) as client:
        replies = [client.post("/v1/chat/completions", json=_body(_data_uri(r[0]), r[1])) for r in requests[:3]]
        assert client.get("/health").json()["status"] == "ok"  # the batcher lives on after requests gave up
    assert all(r.status_code == 504 and _error(r)["type"] == "timeout" and "no answer within" in _error(r)["message"]
               for r in replies)


@pytest.mark.browser
def test_the_app_in_a_real_browser_answers_a_dicom_and_draws_the_maps(folders, requests, tmp_path):
    """Playwright drives Debian's chromium (headless; `make test` installs it when missing): upload a DICOM, ask,
    and the teacher's and the student's answers and heat-maps appear; a screenshot is kept in the test's folder."""
    import shutil

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on this machine (make test installs it with apt-get)")
    teacher, student = folders
    dicom = next(path for path, _ in requests if path.suffix == ".dcm")
    port = free_port()
    command = [*CLI, "app",
               "--model", str(teacher), "--compare", str(student), "--port", str(port), "--max-new-tokens", "6"]
    log = tmp_path / "app.log"
    app = spawn(command, log, GRADIO_ANALYTICS_ENABLED="False")
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(900):
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail(f"the app did not start:\n{tail(log)}")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="networkidle")
            page.locator("#ask").wait_for(timeout=120_000)  # the app has rendered
            for attempt in range(4):  # a file set while the page still re-renders is lost: set it again
                page.locator("#scan input[type=file]").set_input_files(str(dicom))
                try:
                    page.get_by_text(dicom.name).first.wait_for(timeout=30_000)  # uploaded
                    break
                except Exception:
                    if attempt == 3:
                        page.screenshot(path=str(tmp_path / "upload.png"), full_page=True)
                        (tmp_path / "page.html").write_text(page.content())
                        pytest.fail(f"the upload never showed {dicom.name}; the app said:\n{tail(log)}")
            question = page.locator("#question input")
            question.fill("Is there a lesion in this image? Answer yes or no.")
            question.press("Enter")
            page.locator("#ask").click()
            for column in (0, 1):
                page.locator(f"#answer-{column}").get_by_text("Answer:").wait_for(timeout=120_000)
                page.locator(f"#grid-{column} img").first.wait_for(timeout=120_000)
            teacher_text = page.locator("#answer-0").inner_text()
            assert "Without the region" in teacher_text and "nats" in teacher_text  # the counterfactual
            assert "Without the region" not in page.locator("#answer-1").inner_text()  # the student has none
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
            browser.close()
        assert (tmp_path / "app.png").stat().st_size > 10_000
    finally:
        app.terminate()
        app.wait(timeout=30)
