"""Leak probe and counterfactual accuracy of each intervention for one Stage I/II folder.

    python benchmarks/counterfactual_leak.py --model runs/demo3/seed_0/stage1 --data DATA_DIR \
        --interventions zero,inpaint,pixels,reference --output runs/leak.json

DATA_DIR holds SynthMed's train.jsonl and test.jsonl (the demo's cache folder data-*). For each intervention: a linear
probe for the largest lesion's quadrant on M and on M' (eval/diagnostics.leak_probe) and the accuracy on the test
lesion questions with M' (`evaluate(..., branch="counterfactual")`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medsynapse.data.schema import read_samples
from medsynapse.eval.diagnostics import leak_probe
from medsynapse.eval.report import write_json
from medsynapse.eval.vqa import evaluate
from medsynapse.model.medsynapse import MedSynapseV


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--interventions", default="zero,inpaint,pixels,reference")
    parser.add_argument("--output", default="runs/counterfactual_leak.json")
    args = parser.parse_args()
    data = Path(args.data)
    train = [s for s in read_samples(data / "train.jsonl") if s.family == "lesion"]
    test = [s for s in read_samples(data / "test.jsonl") if s.family == "lesion"]
    questions = [s for s in test if s.answer_type != "caption"]
    model = MedSynapseV.from_pretrained(args.model, merge_adapter=True)
    results = {}
    for intervention in args.interventions.split(","):
        probe = leak_probe(model, train, test, intervention)
        cf = evaluate(model, questions, branch="counterfactual", intervention=intervention, batch_size=64)
        results[intervention] = {**{k: probe[k] for k in ("memory", "memory_ci95", "counterfactual",
                                                        "counterfactual_ci95", "chance", "counterfactual_at_chance")},
                                 "counterfactual_accuracy": cf["accuracy"]}
        print(intervention, json.dumps(results[intervention]))
    write_json(args.output, results)


if __name__ == "__main__":
    main()
