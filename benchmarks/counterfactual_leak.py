"""Leak probe and counterfactual accuracy of each intervention for one Stage I/II folder.

    python benchmarks/counterfactual_leak.py --model runs/demo3/seed_0/stage2 --data DATA_DIR \
        --interventions zero,inpaint,pixels,pixels_true_mask,healthy_twin,reference --output runs/leak.json

DATA_DIR holds SynthMed's train.jsonl and test.jsonl (the demo's cache folder data-*). For each intervention: a linear
probe for the largest lesion's quadrant on M and on M' (eval/diagnostics.leak_probe) and the accuracy on the test
lesion questions with M' (`evaluate(..., branch="counterfactual")`). Two references that only SynthMed can give:
`healthy_twin` (M' = the memory of the same scan drawn without its lesions, `render_scan(..., paint_lesions=False)`:
the true counterfactual, what a leak-free intervention should match) and `pixels_true_mask` (`pixels` with the
ground-truth lesion mask as the region: what the image edit leaves even when the region is perfect).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medsynapse.data.schema import read_samples
from medsynapse.data.synthmed import render_scan
from medsynapse.eval import diagnostics
from medsynapse.eval.diagnostics import leak_probe
from medsynapse.eval.report import write_json
from medsynapse.eval.vqa import evaluate
from medsynapse.model.counterfactual import inpaint_pixels
from medsynapse.model.encoders import base as encoder_base
from medsynapse.model.medsynapse import MedSynapseV

SYNTHMED_ONLY = ("healthy_twin", "pixels_true_mask")


def synthmed_counterfactuals(data: Path, data_seed: int, kind: str):
    """Patch the image loading of the probes and evaluation so that the `pixels` path re-encodes, for each image,
    its healthy twin or the image filled inside its true lesion mask (an image object -> its SynthMed file stem)."""
    stems: dict[int, str] = {}
    load = diagnostics.load_image

    def loading(path, sample):
        image = load(path, sample)
        stems[id(image)] = Path(path).stem
        return image

    def counterfactual(self, images):
        edited = []
        for image in images:
            split, index = stems[id(image)].split("_")
            key = [data_seed, {"train": 0, "test": 1}[split], int(index)]  # generate_split's seeds
            if kind == "healthy_twin":
                twin = render_scan(np.random.default_rng(key), image.size[0], paint_lesions=False)
                edited.append(Image.fromarray(twin.image))
            else:
                scan = render_scan(np.random.default_rng(key), image.size[0])
                pixels = self.preprocess([image])
                filled = inpaint_pixels(pixels, torch.from_numpy(scan.mask)[None])
                edited.append(Image.fromarray((filled[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)))
        return self.encode(edited)

    diagnostics.load_image = loading
    encoder_base.PriorEncoder.encode_counterfactual = counterfactual


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--interventions", default="zero,inpaint,pixels,reference")
    parser.add_argument("--data-seed", type=int, default=0,
                        help="SynthMed's data seed (for healthy_twin and pixels_true_mask)")
    parser.add_argument("--output", default="runs/counterfactual_leak.json")
    args = parser.parse_args()
    data = Path(args.data)
    train = [s for s in read_samples(data / "train.jsonl") if s.family == "lesion"]
    test = [s for s in read_samples(data / "test.jsonl") if s.family == "lesion"]
    questions = [s for s in test if s.answer_type != "caption"]
    model = MedSynapseV.from_pretrained(args.model, merge_adapter=True)
    results = {}
    names = args.interventions.split(",")
    # the SynthMed-only ones patch the `pixels` path: run them after the real interventions
    for intervention in [n for n in names if n not in SYNTHMED_ONLY] + [n for n in names if n in SYNTHMED_ONLY]:
        used = intervention
        if intervention in SYNTHMED_ONLY:  # through the `pixels` path with the SynthMed image as the edit
            synthmed_counterfactuals(data, args.data_seed, intervention)
            used = "pixels"
        probe = leak_probe(model, train, test, used, labels=("location",))
        cf = (evaluate(model, questions, branch="counterfactual", intervention=used, batch_size=64)
              if intervention not in SYNTHMED_ONLY else {"accuracy": None})
        results[intervention] = {**{k: probe[k] for k in ("memory", "memory_ci95", "counterfactual",
                                                        "counterfactual_ci95", "chance", "counterfactual_at_chance")},
                                 "counterfactual_accuracy": cf["accuracy"]}
        print(intervention, json.dumps(results[intervention]))
    write_json(args.output, results)


if __name__ == "__main__":
    main()
