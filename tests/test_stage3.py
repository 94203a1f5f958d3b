"""Stage III: A_psi, gradients to A_psi only, exact resume, and the encoder-free student folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import Interrupted, crash_at, write_dicom
from safetensors.torch import load_file

from medsynapse.data.images import load_image
from medsynapse.data.schema import read_samples
from medsynapse.model import medsynapse as medsynapse_module
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.memory import AutonomousConfig, AutonomousMemoryModule, count_parameters
from medsynapse.model.vlm import completion_mask, completion_outputs, vision_features
from medsynapse.objectives.jsd import generalized_jsd
from medsynapse.recipes.stage3_imt import Stage3Config, train_stage3


def _config(tiny_env, stage2_dir, out, **kw):
    base = dict(model=str(stage2_dir), train_file=str(tiny_env.train_file), output_dir=str(out), batch_size=4,
                max_steps=4, save_every=2, lr=1e-3, max_new_tokens=4, log_every=1)
    base.update(kw)
    return Stage3Config(**base)


def test_autonomous_module_size_at_qwen3_vl_8b_width():
    with torch.device("meta"):
        module = AutonomousMemoryModule(AutonomousConfig(hidden_size=4096, n_memory=16))
    assert abs(count_parameters(module) - 33.6e6) < 0.1e6  # the paper scripts' ~33.6 M, not the reference's 302 M


def test_autonomous_pooling_keeps_layout_and_handles_multi_image():
    module = AutonomousMemoryModule(AutonomousConfig(hidden_size=8, n_memory=4))
    tokens = torch.arange(16.0).reshape(16, 1).expand(16, 8)  # a 4x4 grid
    pooled = module.pool(tokens, (4, 4))
    assert pooled.shape == (4, 8)
    assert pooled[0, 0] < pooled[1, 0] < pooled[3, 0]  # top-left slot averages the top-left quarter
    out = module([tokens, tokens * 2, tokens], [(4, 4)] * 3, images_per_sample=[2, 1])
    assert out.shape == (2, 4, 8) and torch.isfinite(out).all()


def test_jsd_gradients_reach_a_psi_only(tiny_env, stage2_dir):
    model = MedSynapseV.from_pretrained(stage2_dir)
    hidden = model.vlm.get_base_model().config.text_config.hidden_size
    model.autonomous = AutonomousMemoryModule(AutonomousConfig(hidden_size=hidden, n_memory=model.n_memory))
    samples = read_samples(tiny_env.train_file)[:3]
    images = [load_image(s.images[0], s) for s in samples]
    batch = model.prompts.collate([model.prompts.encode([im], s.question) for im, s in zip(images, samples)])
    with torch.no_grad():
        features = vision_features(model.vlm, batch)
        teacher_memory = model.memory(model.prior(images))
    student_memory = model.autonomous_memory(batch, features)
    tokens = model.generate(batch, student_memory.detach(), max_new_tokens=3, min_new_tokens=3, features=features)
    mask = completion_mask(tokens, model.prompts.eos_id)
    with torch.no_grad():
        teacher = completion_outputs(model.vlm, batch, teacher_memory, tokens, mask, model.latent_id, features)
    student = completion_outputs(model.vlm, batch, student_memory, tokens, mask, model.latent_id, features)
    generalized_jsd(student, teacher, mask).backward()
    assert all(p.grad is not None for p in model.autonomous.parameters())
    assert all(p.grad is None for p in model.vlm.parameters())  # base VLM and LoRA
    assert all(p.grad is None for p in model.sampler.parameters())
    assert all(p.grad is None for p in model.encoder.parameters())


def test_stage3_resumes_exactly_and_student_loads_without_encoder_or_sampler(tiny_env, stage2_dir, tmp_path,
                                                                          monkeypatch):
    straight = train_stage3(_config(tiny_env, stage2_dir, tmp_path / "a"))

    with pytest.raises(Interrupted):
        train_stage3(_config(tiny_env, stage2_dir, tmp_path / "b"), on_step=crash_at(3))
    resumed = train_stage3(_config(tiny_env, stage2_dir, tmp_path / "b", resume=True))
    a, b = load_file(str(straight / "autonomous.safetensors")), load_file(str(resumed / "autonomous.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def forbidden(*args, **kwargs):
        raise AssertionError("the encoder-free student must not construct the encoder or the sampler")

    monkeypatch.setattr(medsynapse_module, "load_encoder", forbidden)
    monkeypatch.setattr(medsynapse_module, "DiagnosticMemorySampler", forbidden)
    student = MedSynapseV.from_pretrained(straight, merge_adapter=True)
    assert student.encoder is None and student.sampler is None and student.autonomous is not None
    image = next((tiny_env.root / "data" / "images").glob("test_*.png"))
    answers = student.answer([load_image(str(image))] * 2, ["Is there a lesion in this image? Answer yes or no.",
                                                            "How many lesions are visible? Answer with one word."])
    assert len(answers) == 2 and all(isinstance(x, str) for x in answers)


def _student_logits(model: MedSynapseV, samples, images) -> torch.Tensor:
    batch = model.prompts.collate([model.prompts.encode([im], s.question, s.answer) for im, s in zip(images, samples)])
    with torch.no_grad():
        features = vision_features(model.vlm, batch)
        memory = model.memory_for(batch, images, features)
        return model.forward(batch, memory, features=features, labels=None).logits


def test_merging_a_non_trivial_lora_changes_nothing(tiny_env, stage2_dir, tmp_path):
    """The Stage II LoRA folded into the weights gives the same logits as the adapter applied on the fly, for an
    adapter that really changes the model (a 2-step adapter is ~0 and would pass whatever merging did)."""
    import shutil

    from safetensors.torch import save_file

    student_dir = train_stage3(_config(tiny_env, stage2_dir, tmp_path / "student", max_steps=1))
    adapter = next(student_dir.rglob("adapter_model.safetensors"))
    weights = load_file(str(adapter))
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(v.shape, generator=g) * 0.3 for k, v in weights.items()}, str(adapter))
    samples = read_samples(tiny_env.train_file)[:3]
    images = [load_image(s.images[0], s) for s in samples]
    unmerged = MedSynapseV.from_pretrained(student_dir)
    merged = MedSynapseV.from_pretrained(student_dir, merge_adapter=True)
    a, b = _student_logits(unmerged, samples, images), _student_logits(merged, samples, images)
    with unmerged.vlm.disable_adapter():
        without = _student_logits(unmerged, samples, images)
    effect = (a - without).abs().max()
    assert effect > 1.0  # the adapter moves the logits by more than a nat
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)  # >= 10^4 below the adapter's effect
    shutil.rmtree(student_dir)


def test_dicom_windowing(tmp_path):
    hu = np.tile(np.linspace(-1000, 1000, 64), (64, 1))
    path = tmp_path / "ct.dcm"
    write_dicom(path, hu + 1024, slope=1.0, intercept=-1024, window=(40, 400))
    img = np.asarray(load_image(str(path)))
    assert img.shape == (64, 64, 3)
    assert img[0, 0, 0] == 0 and img[0, -1, 0] == 255  # air black, bone white under a soft-tissue window
    mid = np.asarray(load_image(str(path), window=(0, 2000)))[0, 32, 0]
    assert 110 < mid < 145  # 0 HU sits mid-grey in a wide window
    lung = np.asarray(load_image(str(path), window=(-600, 1500)))[0, :, 0]  # off-centre: [-1350, 150] HU
    stored = (hu[0] + 1024).astype(np.int16) - 1024.0  # the integer HU the file holds
    expected = np.clip((stored + 1350) / 1500, 0, 1) * 255
    assert np.abs(lung.astype(float) - expected).max() <= 0.5 + 1e-9  # rounding only
    inverted = tmp_path / "mono1.dcm"
    write_dicom(inverted, hu + 1024, photometric="MONOCHROME1", intercept=-1024)
    assert np.asarray(load_image(str(inverted)))[0, 0, 0] == 255


@pytest.mark.parametrize("center", [40.0, [40.0, -600.0]])  # one window, or several (the first is the default)
def test_a_slice_inside_the_files_window_keeps_its_grey_levels(tmp_path, center):
    """Values -100..100 HU under the file's soft-tissue window (40, 400) = [-160, 240] HU: grey 38..166, not the
    black-to-white stretch that min-max scaling of the slice would give."""
    hu = np.tile(np.linspace(-100, 100, 64), (64, 1))
    path = tmp_path / "inside.dcm"
    width = [400.0, 1500.0] if isinstance(center, list) else 400.0
    write_dicom(path, hu + 1024, slope=1.0, intercept=-1024, window=(center, width))
    img = np.asarray(load_image(str(path)))[0, :, 0].astype(float)
    stored = (hu[0] + 1024).astype(np.int16) - 1024.0  # the integer HU the file holds
    expected = (stored + 160) / 400 * 255
    assert np.abs(img - expected).max() <= 0.5 + 1e-9
    assert 35 < img.min() < 40 and 163 < img.max() < 168


@pytest.mark.parametrize("window", [(40, 0), (40, -400), (float("nan"), 400), (40, float("inf"))])
def test_an_impossible_window_is_refused_with_its_values(tmp_path, window):
    path = tmp_path / "ct.dcm"
    write_dicom(path, np.zeros((8, 8)) + 1024, intercept=-1024)
    with pytest.raises(ValueError, match="width > 0"):
        load_image(str(path), window=window)


def test_corrupt_dicom_is_named(tmp_path):
    from medsynapse.data.schema import DataError

    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not a dicom file at all")
    with pytest.raises(DataError, match="bad.dcm"):
        load_image(str(bad))


def test_memory_alignment_loss_by_value_and_gradient():
    from medsynapse.objectives.alignment import memory_alignment_loss

    teacher = torch.tensor([[[3.0, 4.0]], [[0.0, 0.0]]])  # Σ||M||² = 25
    student = torch.tensor([[[0.0, 4.0]], [[1.0, 0.0]]], requires_grad=True)  # Σ||Δ||² = 9 + 1
    loss = memory_alignment_loss(student, teacher)
    torch.testing.assert_close(loss, torch.tensor(10 / 25))
    loss.backward()
    torch.testing.assert_close(student.grad, 2 * (student.detach() - teacher) / 25)
    assert float(memory_alignment_loss(teacher.clone(), teacher)) == 0.0
    assert float(memory_alignment_loss(torch.zeros_like(teacher), teacher)) == 1.0
    with pytest.raises(ValueError, match="differ"):
        memory_alignment_loss(student[:1], teacher)


def test_memory_alignment_pulls_the_student_memory_toward_the_teachers(tiny_env, stage2_dir, tmp_path):
    """Same seed and steps, alignment weight 0 (the paper) vs 5: the aligned student's memory is closer to the
    teacher's on the training images; a negative weight is refused before anything loads."""
    from medsynapse.objectives.alignment import memory_alignment_loss

    plain = train_stage3(_config(tiny_env, stage2_dir, tmp_path / "plain", max_steps=6, lr=3e-3))
    aligned = train_stage3(_config(tiny_env, stage2_dir, tmp_path / "aligned", max_steps=6, lr=3e-3,
                                   memory_alignment=5.0))
    teacher = MedSynapseV.from_pretrained(stage2_dir)
    samples = read_samples(tiny_env.train_file)[:8]
    images = [load_image(str(tiny_env.train_file.parent / s.images[0])) for s in samples]
    distances = {}
    for name, folder in (("plain", plain), ("aligned", aligned)):
        student = MedSynapseV.from_pretrained(folder)
        batch = student.prompts.collate([student.prompts.encode([im], s.question) for im, s in zip(images, samples)],
                                        with_answers=False)
        with torch.no_grad():
            features = vision_features(student.vlm, batch)
            distances[name] = float(memory_alignment_loss(student.memory_for(batch, images, features),
                                                          teacher.memory(teacher.prior(images))))
    assert distances["aligned"] < 0.8 * distances["plain"], distances
    with pytest.raises(ValueError, match="memory_alignment"):
        train_stage3(_config(tiny_env, stage2_dir, tmp_path / "bad", memory_alignment=-1.0))


def test_memory_alignment_weight_scales_the_term_in_the_loss_and_gradient(tiny_env, stage2_dir, tmp_path,
                                                                           monkeypatch):
    """The weight is the weight: on the same first step (same A_psi, batch and rollouts), the loss that reaches
    backward is JSD + w·L_align, so loss(2) − loss(0) = 2·(loss(1) − loss(0)) and the same for A_psi's gradients.
    (Weight 5 against 0 alone cannot tell w from 1: Adam's first steps barely see the gradient's scale.)"""
    from medsynapse.recipes import trainer

    make_accelerator = trainer.make_accelerator
    seen: dict[str, dict] = {}

    def recording(output_dir, report_to):
        accelerator = make_accelerator(output_dir, report_to)
        record = seen.setdefault(str(output_dir), {})
        prepare, backward, log = accelerator.prepare, accelerator.backward, accelerator.log

        def prepare_and_keep(*objects):
            prepared = prepare(*objects)
            record["student"] = prepared[0]
            return prepared

        def backward_and_keep(loss, **kwargs):
            record["loss"] = loss.detach().clone()
            backward(loss, **kwargs)
            record["grads"] = [p.grad.detach().clone() for p in record["student"].parameters()
                               if p.grad is not None]

        def log_and_keep(values, step=None, **kwargs):
            record.setdefault("logs", values)  # the first step's
            log(values, step=step, **kwargs)

        accelerator.prepare, accelerator.backward, accelerator.log = prepare_and_keep, backward_and_keep, log_and_keep
        return accelerator

    monkeypatch.setattr(trainer, "make_accelerator", recording)
    runs = {}
    for weight in (0.0, 1.0, 2.0):
        out = tmp_path / f"w{weight:g}"
        train_stage3(_config(tiny_env, stage2_dir, out, max_steps=1, save_every=1, memory_alignment=weight,
                             report_to="none", batch_size=2, max_new_tokens=2))
        runs[weight] = seen[str(out)]
    jsd, alignment = runs[0.0]["logs"]["jsd"], runs[0.0]["logs"]["memory_alignment"]
    assert alignment > 0.1  # a random A_psi is far from the teacher's memory: the term is not negligible
    for weight, run in runs.items():  # the same step: same JSD and alignment whatever the weight
        assert (run["logs"]["jsd"], run["logs"]["memory_alignment"]) == (jsd, alignment)
        expected = torch.tensor(jsd, dtype=torch.float32) + weight * torch.tensor(alignment, dtype=torch.float32)
        torch.testing.assert_close(run["loss"], expected, atol=0, rtol=2 ** -22)
    loss = {w: runs[w]["loss"].double() for w in runs}
    # measured gap 5.6e-8 on 3.68 (float32 rounding of JSD + w·L_align)
    torch.testing.assert_close(loss[2.0] - loss[0.0], 2 * (loss[1.0] - loss[0.0]), atol=0, rtol=2 ** -20)
    grads = {w: torch.cat([g.flatten() for g in runs[w]["grads"]]).double() for w in runs}
    assert grads[0.0].numel() == grads[1.0].numel() > 0
    scale = float(grads[2.0].abs().max())
    difference = (grads[2.0] - grads[0.0]) - 2 * (grads[1.0] - grads[0.0])
    # measured: 1.3e-5 against a largest gradient of 182 (7e-8 of it, float32 rounding); allowed 8·2⁻²³ of it
    assert float(difference.abs().max()) <= 8 * 2 ** -23 * scale, (float(difference.abs().max()), scale)
    assert float((grads[1.0] - grads[0.0]).abs().max()) > 1e-3 * scale  # the term moves the gradient
