"""`medsynapse app --model DIR [--compare DIR2]`: a browser app to try a model on one scan (Gradio, local only).

Upload a PNG, JPEG or DICOM (DICOM windowed by a preset: lung, mediastinum, abdomen, bone, brain, or a custom
level/width; "as stored" uses the file's own window), type or pick a question, and get per model: the answer and its
latency; for a model with the prior encoder, the encoder's region over the scan, each probe's cross-attention per
sampler layer as a heat-map grid, and the answer without the region next to the real one with the answer's
log-probability shift (MedSynapseV.counterfactual_check); for an encoder-free student, where A_psi's pooling looked.
With `--compare`, two models side by side (e.g. teacher and student). Every number and map comes from the model
package (`memory_maps`, `counterfactual_check`, `answer`); this module only loads the image and draws.

An upload is held to the server's limits (`AppLimits`, defaults those of `medsynapse serve`), checked by the server's
own functions: its size on disk first (Gradio also refuses a larger upload), then, within `timeout_s` in a worker
thread, a compressed upload inflated (counted, not kept) at most to the decoded limit, width x height from the header
against `max_pixels` before any pixel is decoded, then the decoding itself. A refusal names only the file's own name,
never the folder Gradio keeps uploads in.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
from PIL import Image

from medsynapse.data.images import DICOM_SUFFIXES
from medsynapse.data.views import NIFTI_SUFFIXES, VIEW_AXES

if TYPE_CHECKING:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from medsynapse.model.bases import BaseFolders

WINDOWS = {"as stored": None, "lung": (-600.0, 1500.0), "mediastinum": (50.0, 350.0), "abdomen": (40.0, 400.0),
           "bone": (400.0, 1800.0), "brain": (40.0, 80.0), "custom": "custom"}
# What the upload's file picker offers: every kind `read_upload` reads by its name (a `.nii.gz` volume passes as `.gz`)
UPLOAD_SUFFIXES = (".png", ".jpg", ".jpeg", *DICOM_SUFFIXES, *NIFTI_SUFFIXES[:1], ".gz")
# SynthMed's phrasings (what the demo's models were trained on); any other question can be typed
QUESTIONS = ["Is there a lesion in this image? Answer yes or no.",
             "How many lesions are visible? Answer with one word.",
             "Where is the largest lesion? Options: A. upper left B. upper right C. lower left D. lower right Answer "
             "with the option letter.",
             "What is the size of the largest lesion? Options: A. small B. large Answer with the option letter.",
             "What is the density of the lesions? Options: A. hyperdense B. hypodense Answer with the option letter."]


@dataclass(frozen=True)
class AppLimits:
    """What an upload may be; the defaults are `medsynapse serve`'s (ServeSettings): 4096 x 4096 pixels, 32 bytes
    per such pixel of inflated or decoded data, 32 MiB on disk (the server's body limit), 120 s to read it."""

    max_pixels: int = 4096 * 4096
    max_decoded_bytes: int | None = None  # None: 32 bytes per `max_pixels` pixel, as the server
    max_file_bytes: int = 32 * 2**20
    timeout_s: float = 120.0

    def serve_settings(self):
        """The same limits as the server's settings, for its checks."""
        from medsynapse.serve import ServeSettings

        return ServeSettings(max_pixels=self.max_pixels, max_decoded_bytes=self.max_decoded_bytes,
                             max_body_bytes=self.max_file_bytes, timeout_s=self.timeout_s)


class UploadRefused(ValueError):
    """An upload the app does not read; the message names the file by its own name only."""


def scrubbed(message: str, path: str) -> str:
    """`message` with the upload's full path (and its folder) replaced by the file's own name."""
    name = Path(path).name
    return message.replace(str(path), name).replace(str(Path(path).parent) + os.sep, "")


def check_upload(path: str, limits: AppLimits) -> None:
    """The server's checks before decoding: a compressed upload's inflated size, the header's width x height (and a
    DICOM's decoded size); UploadRefused naming the file."""
    from medsynapse.serve import BadRequest, _check_inflated, _check_size

    settings, name = limits.serve_settings(), Path(path).name
    try:
        _check_inflated(path, name, settings)
        _check_size(path, name, settings)
    except BadRequest as err:
        raise UploadRefused(scrubbed(str(err), path)) from None


def read_upload(path: str, preset: str, level: float, width: float, axis: str = "axial",
                slice_index: float | None = None, limits: AppLimits | None = None) -> Image.Image:
    """An uploaded scan within the limits: its size on disk, then (in a worker thread, within `timeout_s`) the
    server's checks and the decoding (`load_scan`). Every refusal is UploadRefused naming only the file's name."""
    limits = limits or AppLimits()
    name, size = Path(path).name, os.path.getsize(path)
    if size > limits.max_file_bytes:
        raise UploadRefused(f"{name}: {size} bytes, more than {limits.max_file_bytes} (--max-file-mb)")

    def read() -> Image.Image:
        check_upload(path, limits)
        return load_scan(path, preset, level, width, axis, slice_index)

    pool = ThreadPoolExecutor(1, thread_name_prefix="upload")
    try:
        return pool.submit(read).result(timeout=limits.timeout_s)
    except FutureTimeout:
        raise UploadRefused(f"{name}: not read within {limits.timeout_s} s (--timeout)") from None
    except UploadRefused:
        raise
    except ValueError as err:  # DataError: what was wrong with the file, named by the path Gradio stored it under
        raise UploadRefused(scrubbed(str(err), path)) from None
    finally:
        pool.shutdown(wait=False)  # a decode past the timeout finishes in its thread, unread


def load_scan(path: str, preset: str, level: float, width: float, axis: str = "axial",
              slice_index: float | None = None) -> Image.Image:
    """The upload through the project's loader (DICOM and NIfTI windowed by the preset or the custom level/width;
    a NIfTI volume shows the `axis` view's slice `slice_index`, the middle one when empty or negative)."""
    from medsynapse.data.images import VolumeView, is_nifti, load_image

    window = WINDOWS[preset]
    if window == "custom":
        window = (float(level), float(width))
    view = None
    if is_nifti(path):
        chosen = None if slice_index is None or slice_index < 0 else int(slice_index)
        view = VolumeView(axis=axis, slice=chosen)
    return load_image(path, window=cast("tuple[float, float] | None", window), view=view)  # "custom" replaced above


def overlay(image: Image.Image, heat: np.ndarray, colour: tuple[int, int, int] = (255, 40, 40),
            side: int = 384) -> Image.Image:
    """`heat` (h, w), scaled to its maximum, blended in `colour` over the image shown at least `side` px wide."""
    scale = max(1, side // max(image.size))
    # Image.NEAREST: Pillow sets its filter constants with setattr, which type checkers do not see;
    # np.uint8(array) is an array, numpy's stubs type it as a scalar
    shown = image.convert("RGB").resize((image.width * scale, image.height * scale),
                                        Image.NEAREST)  # type: ignore[attr-defined]  # set by setattr in PIL.Image
    grid = Image.fromarray(cast(np.ndarray, np.uint8(255 * np.clip(heat / max(float(heat.max()), 1e-9), 0, 1))))
    alpha = np.asarray(grid.resize(shown.size, Image.NEAREST),  # type: ignore[attr-defined]  # as above
                       dtype=np.float32)[..., None] / 255 * 0.6
    base = np.asarray(shown, dtype=np.float32)
    return Image.fromarray(cast(np.ndarray, np.uint8(base * (1 - alpha) + np.array(colour, dtype=np.float32) * alpha)))


def heatmap_grid(probes: np.ndarray, title: str, per_row: int = 8) -> Image.Image:
    """(layers, N, h, w) maps as small heat-maps: per layer, rows of `per_row` probes (numbered)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, n = probes.shape[:2]
    columns, rows_per_layer = min(n, per_row), -(-n // per_row)
    figure, axes = plt.subplots(layers * rows_per_layer, columns, squeeze=False,
                                figsize=(max(0.75 * columns + 0.6, 4.0), 0.8 * layers * rows_per_layer + 0.6))
    for axis in axes.flat:
        axis.axis("off")
    for layer in range(layers):
        for probe in range(n):
            axis = axes[layer * rows_per_layer + probe // per_row][probe % per_row]
            axis.imshow(probes[layer, probe], cmap="magma", interpolation="nearest")
            axis.set_title(f"L{layer} p{probe}", fontsize=6)
    figure.suptitle(title, fontsize=7, wrap=True)
    figure.tight_layout()
    figure.canvas.draw()
    image = Image.fromarray(np.asarray(cast("FigureCanvasAgg", figure.canvas).buffer_rgba())).convert("RGB")  # Agg
    plt.close(figure)
    return image


def explain(model, image: Image.Image, question: str, max_new_tokens: int) -> dict:
    """Everything the page shows for one model: answer, latency, maps and the counterfactual."""
    from medsynapse.answers import format_prompt

    prompt = format_prompt(question, model.answer_format)
    start = time.perf_counter()
    answer = model.answer([image], [prompt], max_new_tokens=max_new_tokens)[0]
    out = {"answer": answer, "ms": 1000 * (time.perf_counter() - start), "overlay": None, "grid": None,
           "counterfactual": None}
    maps = model.memory_maps(image)
    if maps is not None:
        probes = maps["probes"].float().cpu().numpy()
        if "region" in maps:  # the teacher: the encoder's region, the probes over the prior tokens
            out["overlay"] = overlay(image, maps["region"].cpu().numpy())
            out["grid"] = heatmap_grid(probes, "each probe's cross-attention over the prior tokens, per layer")
            out["counterfactual"] = model.counterfactual_check(image, prompt, max_new_tokens)
        else:  # the student: where A_psi's pooling looked
            out["overlay"] = overlay(image, probes[0].mean(0), colour=(40, 160, 255))
            out["grid"] = heatmap_grid(probes, "A_psi's attention over the VLM's visual tokens, per memory slot")
    return out


def summary(result: dict) -> str:
    lines = [f"**Answer:** {result['answer']}", f"latency: {result['ms']:.0f} ms"]
    check = result["counterfactual"]
    if check is not None:
        lines += [f"**Without the region** ({check['intervention']}): {check['answer_without_region']}",
                  f"log p(answer | M) − log p(answer | M') = {check['logprob_shift']:+.3f} nats"]
    return "\n\n".join(lines)


def ask(models: Mapping[str, object], limits: AppLimits, max_new_tokens: int, path: str | None, preset_name: str,
        level_value: float, width_value: float, axis_name: str, slice_value: float | None, text: str | None) -> list:
    """The page's handler: the error line, then per model its summary, overlay and probe grid. An upload refused
    (limits, a damaged file) is the error line alone, naming the file by its own name."""
    blank = [None] * (3 * len(models))
    if not path:
        return ["Upload a scan first.", *blank]
    try:
        image = read_upload(path, preset_name, level_value, width_value, axis_name, slice_value, limits)
    except UploadRefused as err:
        return [f"**Cannot read the scan:** {err}", *blank]
    values: list[str | Image.Image | None] = [""]
    for model in models.values():
        result = explain(model, image, text or QUESTIONS[0], max_new_tokens)
        values += [summary(result), result["overlay"] or overlay(image, np.zeros((1, 1))), result["grid"]]
    return values


def build(models: Mapping[str, object], max_new_tokens: int = 16, limits: AppLimits | None = None):
    """The Gradio Blocks for one or two loaded models (name -> MedSynapseV), uploads held to `limits`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    with gr.Blocks(title="MedSynapse") as demo:
        gr.Markdown("# MedSynapse\nA research model, not a medical device. Upload a scan and ask about it.")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="scan (PNG, JPEG, DICOM or NIfTI)", file_types=list(UPLOAD_SUFFIXES),
                                 type="filepath",
                                 elem_id="scan")
                preset = gr.Dropdown(list(WINDOWS), value="as stored", label="DICOM / NIfTI window")
                with gr.Row():
                    level = gr.Number(value=40, label="level (custom)")
                    width = gr.Number(value=400, label="width (custom)")
                with gr.Row():  # NIfTI volumes only
                    axis = gr.Dropdown(list(VIEW_AXES), value=VIEW_AXES[0], label="NIfTI view", elem_id="view")
                    slice_index = gr.Number(value=-1, precision=0, label="NIfTI slice (-1: middle)",
                                            elem_id="slice")
                question = gr.Dropdown(QUESTIONS, value=QUESTIONS[0], allow_custom_value=True, label="question",
                                       elem_id="question")
                ask_button = gr.Button("Ask", variant="primary", elem_id="ask")
                error = gr.Markdown(elem_id="error")
            outputs: list[tuple[gr.Markdown, gr.Image, gr.Image]] = []
            for name in models:
                with gr.Column(scale=2):
                    gr.Markdown(f"### {name}")
                    answer = gr.Markdown(elem_id=f"answer-{len(outputs)}")
                    shown = gr.Image(label="region / attention over the scan", type="pil",
                                     elem_id=f"overlay-{len(outputs)}")
                    grid = gr.Image(label="probe maps", type="pil", elem_id=f"grid-{len(outputs)}")
                    outputs.append((answer, shown, grid))

        run = partial(ask, models, limits or AppLimits(), max_new_tokens)
        ask_button.click(run, [upload, preset, level, width, axis, slice_index, question],
                  [error, *[component for triple in outputs for component in triple]])
    return demo


def launch(model_dir: str, compare: str | None = None, host: str = "127.0.0.1", port: int = 7860,
           max_new_tokens: int = 16, bases: BaseFolders | None = None, limits: AppLimits | None = None) -> None:
    """The app on `model_dir` (and `compare` beside it); `bases`: their base VLM / encoder given explicitly;
    `limits`: what an upload may be (default the server's)."""
    limits = limits or AppLimits()
    import gradio as gr

    from medsynapse.model.medsynapse import MedSynapseV

    folders = [model_dir, *([compare] if compare else [])]
    names = [Path(f).name for f in folders]
    if len(set(names)) < len(names):  # two folders of the same name: say which is which
        names = [f"{label}: {name}" for label, name in zip("AB", names)]
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = {name: MedSynapseV.from_pretrained(folder, merge_adapter=True, bases=bases).eval().to(device)
              for name, folder in zip(names, folders)}
    demo = build(models, max_new_tokens, limits)
    print(f"app on http://{host}:{port}", flush=True)
    demo.launch(server_name=host, server_port=port, share=False, show_error=True, max_file_size=limits.max_file_bytes,
                theme=gr.themes.Base(font=["sans-serif"], font_mono=["monospace"]))  # no web fonts fetched
