"""`medsynapse serve`: 32 concurrent requests (PNG, JPEG, DICOM mixed) against a real server process, each answered as
it would be alone; every bad input gets its 4xx and the server keeps serving; the encoder-free student is served the
same way; a full queue is a 503 and a late answer a 504."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import write_dicom
from PIL import Image

from medsynapse.data.images import load_image
from medsynapse.data.schema import read_samples
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.objectives.answers import format_prompt
from medsynapse.serve import BadRequest, Batcher, Job, ServeSettings, create_app

MIME = {".png": "image/png", ".jpg": "image/jpeg", ".dcm": "application/dicom"}


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


def _spawn(command: list[str], log: Path, **env: str) -> subprocess.Popen:
    """Start a server whose output goes to a file: a pipe nobody reads fills (64 KB) and blocks the server."""
    return subprocess.Popen(command, env={**os.environ, "TQDM_DISABLE": "1", **env}, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no output)"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (40, 40, 40)).save(buffer, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def test_served_answers_equal_one_at_a_time_and_bad_input_gets_its_4xx(folders, requests, tmp_path):
    teacher, _ = folders
    port = _free_port()
    command = [sys.executable, "-c", "from medsynapse.cli import main; raise SystemExit(main())", "serve",
               "--model", str(teacher), "--port", str(port), "--max-batch", "8", "--max-wait-ms", "200",
               "--max-pixels", str(100 * 100), "--max-body-mb", "1", "--allow-dir", str(requests[0][0].parent)]
    log = tmp_path / "server.log"
    server = _spawn(command, log)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=120) as client:
            for _ in range(600):
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            else:
                pytest.fail(f"the server did not start:\n{_tail(log)}")
            models = client.get("/v1/models").json()["data"]
            assert models[0]["id"] == teacher.name and models[0]["memory"] == "encoder"

            with ThreadPoolExecutor(32) as pool:
                replies = list(pool.map(lambda r: client.post("/v1/chat/completions",
                                                             json=_body(_data_uri(r[0]), r[1])), requests))
            model = MedSynapseV.from_pretrained(teacher, merge_adapter=True)
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
            bad = {
                "not an image": (_body("data:image/png;base64," + base64.b64encode(b"hello").decode(), "q"), 400,
                                 "corrupt or unreadable image"),
                "corrupt DICOM": (_body("data:application/dicom;base64," + base64.b64encode(
                    dicom.read_bytes()[:300]).decode(), "q"), 400, "DICOM"),
                "too many pixels": (_body(_png(200, 200), "q"), 413, "more than --max-pixels"),
                "wrong schema": ({"messages": [{"role": "user"}]}, 422, "content"),
                "no image": ({"messages": [{"role": "user", "content": "is there a lesion?"}]}, 400, "no image"),
                "not base64": (_body("data:image/png;base64,@@@", "q"), 400, "base64"),
                "unsupported type": (_body("data:image/gif;base64,R0lG", "q"), 415, "image/gif"),
                "path not allowed": (_body("/etc/hostname", "q"), 403, "--allow-dir"),
                "unknown model": ({**good, "model": "gpt-4"}, 404, "not served"),
                "too many tokens": ({**good, "max_tokens": 10_000}, 400, "max_tokens"),
                "body too large": (_body("data:image/png;base64," + "A" * (2 * 2**20), "q"), 413, "body larger"),
            }
            for name, (body, status, words) in bad.items():
                reply = client.post("/v1/chat/completions", json=body)
                assert reply.status_code == status, (name, reply.text)
                assert words in reply.text, (name, reply.text)
                after = client.post("/v1/chat/completions", json=good)
                assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == expected[0]
            allowed = client.post("/v1/chat/completions", json=_body(str(requests[1][0]), requests[1][1]))
            assert allowed.json()["choices"][0]["message"]["content"] == expected[1]  # a path under --allow-dir
    finally:
        server.terminate()
        server.wait(timeout=30)


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


def test_a_full_queue_is_a_503_and_a_late_answer_a_504(folders, requests):
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
    teacher, _ = folders
    with TestClient(create_app(str(teacher), ServeSettings(timeout_s=0.0001))) as client:
        replies = [client.post("/v1/chat/completions", json=_body(_data_uri(r[0]), r[1])) for r in requests[:3]]
        assert client.get("/health").json()["status"] == "ok"  # the batcher lives on after requests gave up
    assert all(r.status_code == 504 and "no answer within" in r.text for r in replies)


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
    port = _free_port()
    command = [sys.executable, "-c", "from medsynapse.cli import main; raise SystemExit(main())", "app",
               "--model", str(teacher), "--compare", str(student), "--port", str(port), "--max-new-tokens", "6"]
    log = tmp_path / "app.log"
    app = _spawn(command, log, GRADIO_ANALYTICS_ENABLED="False")
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(900):
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail(f"the app did not start:\n{_tail(log)}")
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
                        pytest.fail(f"the upload never showed {dicom.name}; the app said:\n{_tail(log)}")
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
