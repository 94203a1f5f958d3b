"""Coconut†'s last phase (recipes/coconut.py), by value: after stages 0 .. max_latent_stage comes stage
max_latent_stage + 1, where every reasoning step is latent (max_latent_stage * c thoughts, the reference's
pad_latent_to_max) and only the tagged answer is learned (facebookresearch/coconut dataset.py, `scheduled_stage >
max_latent_stage`: n_skip_steps = 10000)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from medsynapse.data.dataset import training_dataset
from medsynapse.data.schema import Sample
from medsynapse.model.vlm import PromptBuilder
from medsynapse.recipes.coconut import (
    CoconutConfig,
    n_stages,
    stage_dataset,
    stage_of,
    stage_samples,
    stage_thoughts,
)

STEPS = ["A CT image of the abdomen.", "There is one lesion.", "It is in the liver.", "It is round.",
         "It is small."]


def test_stage_of_reaches_the_final_phase_and_stays_there():
    # 5 steps per stage, max_latent_stage 3: stages 0-3 on steps 0-19, the final phase (stage 4) on steps 20-24
    assert n_stages(3) == 5 and n_stages(3, final_stage=False) == 4
    steps = (0, 4, 5, 19, 20, 24, 30)  # first, end of stage 0, start of 1, last of stage 3, first / last of the final
    assert [stage_of(s, 5, 3) for s in steps] == [0, 0, 1, 3, 4, 4, 4]
    assert [stage_of(s, 5, 3, final_stage=False) for s in steps] == [0, 0, 1, 3, 3, 3, 3]
    # one step per stage: the last step of a 5-stage run is the final phase
    assert [stage_of(s, 1, 3) for s in range(5)] == [0, 1, 2, 3, 4]


def test_the_final_phase_drops_every_step_and_keeps_max_latent_stage_times_c_thoughts():
    five = Sample(id="x", images=["i"], question="q", answer="yes", answer_type="yes_no", rationale=STEPS)
    two = dataclasses.replace(five, id="y", rationale=STEPS[:2])
    texts = {s: [t.answer for t in stage_samples([five, two], s, 3)] for s in (3, 4)}
    # stage 3 still writes the steps past the third; the final phase writes none, whatever the chain's length
    assert texts[3] == ["It is round. It is small. <answer>yes</answer>", "<answer>yes</answer>"]
    assert texts[4] == ["<answer>yes</answer>", "<answer>yes</answer>"]
    assert [stage_thoughts(s, 3, 1) for s in range(5)] == [0, 1, 2, 3, 3]
    assert [stage_thoughts(s, 3, 2) for s in range(5)] == [0, 2, 4, 6, 6]


@pytest.fixture(scope="module")
def plain(tiny_env):
    """Two training samples in the reasoning format, one with 2 steps, one with 5."""
    from medsynapse.model.processor import load_processor

    processor = load_processor(tiny_env.vlm)
    dataset = training_dataset(str(tiny_env.train_file), PromptBuilder(processor, 0), [], [], with_answers=True,
                               answer_format="reasoning")
    dataset.samples = [dataclasses.replace(dataset.samples[0], rationale=STEPS[:2]),
                       dataclasses.replace(dataset.samples[1], rationale=STEPS)]
    return dataset


def test_the_final_phase_training_batch_holds_the_thoughts_no_step_text_and_labels_on_the_answer_only(plain):
    config = CoconutConfig(max_latent_stage=3, thoughts_per_step=1)
    tokenizer = plain.prompts.tokenizer
    latent_id, eos = plain.prompts.latent_id, plain.prompts.eos_id

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    answers = [f"<answer>{s.answer}</answer>" for s in plain.samples]
    final, last = stage_dataset(plain, 4, config), stage_dataset(plain, 3, config)
    for dataset in (final, last):
        items = [dataset.encoded(i) for i in range(2)]
        for item in items:  # 3 slots, all at the end of the prompt (where the latent loop writes the thoughts)
            assert int((item.input_ids == latent_id).sum()) == 3
            assert item.input_ids[-3:].tolist() == [latent_id] * 3
        batch = dataset.prompts.collate(items, with_answers=True)
        for row, item in enumerate(items):  # labels exactly on the text after the slots (the answer window)
            supervised = batch.labels[row] != -100
            assert int(supervised.sum()) == len(item.answer_ids)
            assert torch.equal(batch.labels[row][supervised], item.answer_ids)
            assert torch.equal(batch.input_ids[row][supervised], item.answer_ids)
            assert not bool((batch.input_ids[row][supervised] == latent_id).any())
    # the final phase: only the tagged answer (+ end of turn), for the 2-step and the 5-step chain alike
    for row in range(2):
        assert final.encoded(row).answer_ids.tolist() == [*ids(answers[row]), eos]
        text = tokenizer.decode(torch.cat([final.encoded(row).input_ids, final.encoded(row).answer_ids]))
        assert not any(step.rstrip(".").lower() in text.lower() for step in STEPS)
    # stage 3: the 2-step chain is already all latent (the same sample), the 5-step chain still writes steps 4 and 5
    assert torch.equal(last.encoded(0).input_ids, final.encoded(0).input_ids)
    assert torch.equal(last.encoded(0).answer_ids, final.encoded(0).answer_ids)
    assert last.encoded(1).answer_ids.tolist() == [*ids(f"It is round. It is small. {answers[1]}"), eos]
    # the prompts before the slots are the same at every stage; IVT-LR's latent steps take 1 + patches slots each
    assert torch.equal(final.encoded(1).input_ids[:-3], stage_dataset(plain, 0, config).encoded(1).input_ids)
    ivt = stage_dataset(plain, 4, dataclasses.replace(config, patches_per_step=2)).encoded(1)
    assert int((ivt.input_ids == latent_id).sum()) == 9 and ivt.answer_ids.tolist() == [*ids(answers[1]), eos]
