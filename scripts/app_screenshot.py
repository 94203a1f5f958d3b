import os, sys, subprocess, time, socket, httpx, numpy as np
sys.path.insert(0, "/work/serve/tests")
from conftest import write_dicom
from PIL import Image
from medsynapse.data.schema import read_samples
import yaml
run = yaml.safe_load(open("/work/main/runs/demo/run.yaml"))
data = os.path.dirname(run["data"]["stage1_file"])
samples = [s for s in read_samples(f"{data}/test.jsonl") if s.question_type == "presence" and s.answer == "yes"]
img = Image.open(samples[3].images[0]).convert("L")
write_dicom("/tmp/scan.dcm", np.asarray(img, dtype=np.int16) * 4, window=(512, 1024))
port = 7871
app = subprocess.Popen([sys.executable, "-c", "from medsynapse.cli import main; raise SystemExit(main())", "app", "--model", "/work/main/runs/demo/stage2", "--compare", "/work/main/runs/demo/stage3_student", "--port", str(port), "--max-new-tokens", "8"], env={**os.environ, "TQDM_DISABLE": "1"})
try:
    for _ in range(900):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200: break
        except httpx.TransportError: time.sleep(0.1)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"])
        page = b.new_page(viewport={"width": 1400, "height": 1150})
        page.goto(f"http://127.0.0.1:{port}/")
        page.locator("#scan input[type=file]").set_input_files("/tmp/scan.dcm")
        page.get_by_text("scan.dcm").first.wait_for(timeout=120000)
        page.locator("#ask").click()
        for c in (0, 1):
            page.locator(f"#answer-{c}").get_by_text("Answer:").wait_for(timeout=120000)
            page.locator(f"#grid-{c} img").first.wait_for(timeout=120000)
        time.sleep(1)
        page.screenshot(path="/work/serve/docs/app.png", full_page=False)
        print(page.locator("#answer-0").inner_text()); print(page.locator("#answer-1").inner_text())
        b.close()
finally:
    app.terminate(); app.wait()
