"""benchmarks/gpu_realsize.py: the OOM back-off, the KV-cache estimate, the CPU (meta-device) path, and every stage's
step at the tiny preset (what a GPU user runs at full size; the script is otherwise only exercised on a GPU)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_realsize", ROOT / "benchmarks" / "gpu_realsize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_step_that_runs_out_of_memory_is_retried_at_half_the_batch():
    script = _script()
    tried = []

    def step(batch):
        tried.append(batch)
        if batch > 8:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"peak_mem_gib": 1.0}

    assert script._halving(step, 32) == {"peak_mem_gib": 1.0, "batch_requested": 32, "batch_fitted": 8}
    assert tried == [32, 16, 8]
    assert script._halving(lambda b: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")), 4)["batch_fitted"] == 0


def test_the_kv_cache_estimate_counts_keys_and_values_of_every_layer():
    from transformers import Qwen3VLConfig

    from medsynapse.inspection import PRESETS

    config = Qwen3VLConfig(**PRESETS["qwen3-vl-8b"])
    # 2 (K and V) x 36 layers x 8 KV heads x 128 dims x 2 bytes = 147,456 bytes per token
    assert _script().rollout_kv_cache_gib(config, rollouts=32, sequence=1300) == 147_456 * 32 * 1300 / 2**30


def test_without_a_gpu_it_estimates_the_cpu_config_on_the_meta_device(tmp_path):
    out = tmp_path / "meta.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_realsize.py"), "--out", str(out),
                    "--set", "stage2.max_new_tokens=512"], check=True, cwd=ROOT, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["architecture"] == "qwen3-vl-4b" and result["parameters"]["lora"] > 0
    assert result["rollouts"]["stage2"]["max_new_tokens"] == 512 and result["rollouts"]["stage2"]["rollouts"] == 32


def test_every_stage_step_runs_at_the_tiny_preset_from_the_run_file(tmp_path):
    out = tmp_path / "tiny.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_realsize.py"), "--preset", "tiny", "--samples",
                    "1", "--jsd-positions", "8", "--out", str(out), "--set", "stage1.batch_size=2",
                    "stage2.batch_size=2", "stage2.max_new_tokens=4", "stage3.batch_size=2",
                    "stage3.max_new_tokens=4"], check=True, cwd=ROOT, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["stage1_step"]["batch_fitted"] == 2 and result["stage1_step"]["step_s"] > 0
    # the 8B file's G 4 with the overridden prompts and length: 2 x 4 rollouts of up to 4 tokens
    assert (result["stage2_step"]["prompts"], result["stage2_step"]["group"]) == (2, 4)
    assert 0 < result["stage2_step"]["generated_tokens"] <= 2 * 4 * 4
    assert result["stage3_step"]["fused_jsd"] is True and result["stage3_step"]["generated_tokens"] == 2 * 4
    assert abs(result["jsd"]["ours_chunked"]["loss"] - result["jsd"]["naive"]["loss"]) < 1e-5
