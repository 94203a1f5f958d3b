"""The screenshot of `medsynapse app` in docs/serving.md (docs/app.png): the demo's teacher and student side by side
on a held-out SynthMed scan with a lesion, sent as a DICOM, asked the presence question, in headless chromium.

Usage: python scripts/app_screenshot.py --model runs/demo/stage2 --compare runs/demo/stage3_student
       --data DATA/test.jsonl [--out docs/app.png] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_dicom(path: Path, pixels: np.ndarray) -> None:
    """A signed 16-bit CT-like DICOM with its window stored (the app's "as stored" preset applies it)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1.0, 0.0, 512, 1024
    ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--compare", default=None)
    parser.add_argument("--data", required=True, help="a SynthMed split (test.jsonl)")
    parser.add_argument("--out", default="docs/app.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--index", type=int, default=3, help="which scan with a lesion (in file order)")
    args = parser.parse_args()
    import httpx
    from playwright.sync_api import sync_playwright

    from medsynapse.data.schema import read_samples

    scans = [s for s in read_samples(args.data) if s.question_type == "presence" and s.answer == "yes"]
    dicom = Path(tempfile.mkdtemp()) / "scan.dcm"
    write_dicom(dicom, np.asarray(Image.open(scans[args.index].images[0]).convert("L"), dtype=np.int16) * 4)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-c", "from medsynapse.cli import main; raise SystemExit(main())", "app",
               "--model", args.model, "--port", str(port), "--max-new-tokens", "8",
               *(["--compare", args.compare] if args.compare else [])]
    app = subprocess.Popen(command, env={**os.environ, "TQDM_DISABLE": "1", "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        for _ in range(900):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1150})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#scan input[type=file]").set_input_files(str(dicom))
            page.get_by_text(dicom.name).first.wait_for(timeout=120_000)
            page.locator("#ask").click()
            for column in range(2 if args.compare else 1):
                page.locator(f"#answer-{column}").get_by_text("Answer:").wait_for(timeout=120_000)
                page.locator(f"#grid-{column} img").first.wait_for(timeout=120_000)
                print(page.locator(f"#answer-{column}").inner_text().replace("\n\n", " | "))
            time.sleep(1)
            page.screenshot(path=args.out)
            browser.close()
    finally:
        app.terminate()
        app.wait(timeout=30)


if __name__ == "__main__":
    main()
