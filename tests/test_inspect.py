"""`medsynapse inspect` on the real-size configs (meta device: no weights, no memory)."""

from __future__ import annotations

from pathlib import Path

from medsynapse.cli import main
from medsynapse.inspection import from_run, report
from medsynapse.runconfig import read_run_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_inspect_8b_counts_match_the_published_sizes(capsys):
    result = report(from_run(read_run_config(CONFIGS / "medsynapse-v-8b.yaml")))
    counts = result["parameters"]
    assert 8.6e9 < counts["vlm"] < 8.9e9  # Qwen3-VL-8B-Instruct: 8.77 B with its untied lm_head
    assert abs(counts["lora"] - 61.3e6) < 0.1e6  # r 64 on q/k/v/o of 36 layers
    assert abs(counts["autonomous"] - 33.6e6) < 0.1e6
    assert result["stages"]["stage1"]["trainable"] == {"sampler": counts["sampler"]}
    assert result["hidden_size"] == 4096  # the paper's memory output dimension d_m
    assert main(["inspect", "--config", str(CONFIGS / "medsynapse-v-8b.yaml")]) == 0
    out = capsys.readouterr().out
    assert "| stage2 | lora 61.3 M |" in out and "| stage3 | autonomous 33.6 M |" in out


def test_inspect_4b_has_tied_embeddings():
    result = report(from_run(read_run_config(CONFIGS / "medsynapse-v-4b.yaml")))
    assert result["hidden_size"] == 2560
    assert 4.0e9 < result["parameters"]["vlm"] < 4.6e9
