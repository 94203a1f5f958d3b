"""Memory diagnostics: linear probes, what each reliance condition hands the VLM, a student without M', the report."""

from __future__ import annotations

import json

import pytest
import torch

from medsynapse.cli import main
from medsynapse.data.images import load_image
from medsynapse.data.schema import DataError, read_samples, write_samples
from medsynapse.data.synthmed import QUADRANTS
from medsynapse.eval.diagnostics import (
    CONDITIONS,
    collapse_cosine,
    derangement,
    diagnose,
    fit_probe,
    image_table,
    leak_probe,
    linear_probe,
    readability_probes,
    reliance_report,
)
from medsynapse.eval.vqa import evaluate
from medsynapse.model import medsynapse as medsynapse_module
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.memory import AutonomousConfig, AutonomousMemoryModule


def _lesion_questions(path):
    return [s for s in read_samples(path) if s.family == "lesion" and s.answer_type != "caption"]


# --- linear probes ----------------------------------------------------------------------------------------------
def test_linear_probe_reads_a_separable_label_and_is_at_chance_on_random_labels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 20, generator=g)
    score = x @ torch.randn(20, generator=g)
    keep = score.abs() > 0.5  # a margin: linearly separable
    x, y = x[keep], (score[keep] > 0).long()
    half = len(x) // 2
    good = linear_probe(x[:half], y[:half], x[half:], y[half:])
    assert good["accuracy"] >= 0.97 and not good["at_chance"] and good["above_chance"]
    assert good["n_train"] == half and good["n_test"] == len(x) - half and good["strength"] in (1e-3, 1e-2, 1e-1)
    # three classes, labels given as strings
    logits = x @ torch.randn(20, 3, generator=g)
    top2 = logits.topk(2, dim=1).values
    sep = (top2[:, 0] - top2[:, 1]) > 0.5
    names = [("a", "b", "c")[i] for i in logits[sep].argmax(1).tolist()]
    xs, h = x[sep], int(sep.sum()) // 2
    multi = linear_probe(xs[:h], names[:h], xs[h:], names[h:])
    assert multi["accuracy"] >= 0.85 and multi["n_classes"] == 3

    noise_labels = torch.randint(0, 2, (len(x),), generator=g)
    rand = linear_probe(x[:half], noise_labels[:half], x[half:], noise_labels[half:])
    test_labels = noise_labels[half:].tolist()
    assert rand["chance"] == max(test_labels.count(0), test_labels.count(1)) / len(test_labels)
    lo, hi = rand["ci95"]
    assert lo <= rand["chance"] <= hi and rand["at_chance"] and not rand["above_chance"]
    assert lo <= rand["accuracy"] <= hi


def test_regularisation_strength_is_chosen_on_the_train_set_only():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(120, 60, generator=g)
    y = ((x[:, 0] + 1.5 * torch.randn(120, generator=g)) > 0).long()  # noisy, high-dimensional: strength matters
    tr_x, tr_y, te_x, te_y = x[:60], y[:60], x[60:], y[60:]
    strengths = (1e-3, 1e-1, 10.0)
    chosen = linear_probe(tr_x, tr_y, te_x, te_y, strengths=strengths)
    permuted = linear_probe(tr_x, tr_y, te_x, te_y[torch.randperm(60, generator=g)], strengths=strengths)
    assert permuted["strength"] == chosen["strength"] and permuted["cv_accuracy"] == chosen["cv_accuracy"]
    # Test labels that one of the other strengths predicts perfectly: a selection that looked at test labels would
    # switch to that strength; one that only cross-validates on train cannot.
    own = fit_probe(tr_x, tr_y, chosen["strength"])(te_x)
    adversarial = 0
    for strength in strengths:
        other = fit_probe(tr_x, tr_y, strength)(te_x)
        if strength == chosen["strength"] or torch.equal(other, own):
            continue
        adversarial += 1
        result = linear_probe(tr_x, tr_y, te_x, other, strengths=strengths)
        assert result["strength"] == chosen["strength"]
        assert result["cv_accuracy"] == chosen["cv_accuracy"]
    assert adversarial > 0  # the check above really ran


def test_derangement_moves_every_item_and_is_fixed():
    for n in (2, 3, 7, 50):
        perm = derangement(n, seed=3)
        assert sorted(perm) == list(range(n)) and all(p != i for i, p in enumerate(perm))
        assert perm == derangement(n, seed=3)
    with pytest.raises(ValueError):
        derangement(1)


def test_collapse_is_the_mean_cosine_of_flattened_memories_over_pairs_of_images():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # the same slots in another order: slot means would call it equal
    assert collapse_cosine(torch.stack([a, b])) == pytest.approx(0.0)
    assert collapse_cosine(torch.stack([a, a, b])) == pytest.approx((1 + 0 + 0) / 3)
    assert collapse_cosine(a[None]) is None


# --- labels -----------------------------------------------------------------------------------------------------
def test_labels_come_from_the_synthmed_questions_and_a_missing_label_names_the_file(tiny_env, tmp_path):
    samples = read_samples(tiny_env.train_file)
    table = image_table(samples, tiny_env.train_file)
    assert len(table.paths) == 12
    for path, present, quadrant in zip(table.paths, table.presence, table.location):
        count = next(s.answer for s in samples if s.images[0] == path and s.question_type == "count")
        caption = next(s.answer for s in samples if s.images[0] == path and s.id.endswith("_cap_lesion"))
        assert present == (count != "zero")
        assert (quadrant is None) == (not present)
        if present:
            assert f"in the {QUADRANTS[quadrant]} quadrant" in caption
    assert 0 < sum(table.presence) < 12
    general = tmp_path / "general.jsonl"
    write_samples(general, [s for s in samples if s.family == "general"])
    with pytest.raises(DataError, match="general.jsonl.*presence"):
        image_table(read_samples(general), general)
    no_location = tmp_path / "no_location.jsonl"
    write_samples(no_location, [s for s in samples if s.question_type != "location"])
    with pytest.raises(DataError, match="no_location.jsonl.*location bin"):
        image_table(read_samples(no_location), no_location)


# --- reliance ---------------------------------------------------------------------------------------------------
@pytest.fixture()
def spy_memory(monkeypatch):
    """Every memory tensor that reaches the VLM's generation, in call order."""
    seen: list[torch.Tensor] = []
    original = medsynapse_module.generate_with_memory

    def spy(vlm, batch, memory, *args, **kwargs):
        seen.append(None if memory is None else memory.detach().clone())
        return original(vlm, batch, memory, *args, **kwargs)

    monkeypatch.setattr(medsynapse_module, "generate_with_memory", spy)
    return seen


def test_reliance_conditions_change_the_memory_that_reaches_the_vlm(tiny_env, model, spy_memory):
    samples = _lesion_questions(tiny_env.test_file)
    samples = [s for s in samples if s.images[0] in sorted({s.images[0] for s in samples})[:3]]  # 3 images
    size = len(samples)
    result = reliance_report(model, samples, batch_size=size, max_new_tokens=3, keep_predictions=True)
    assert {*CONDITIONS, "collapse_cosine", "by_question_type", "n"} <= set(result)
    assert result["n"] == size and result["skipped"] == {}
    assert all(isinstance(result[c], float) for c in CONDITIONS)
    assert len(spy_memory) == len(CONDITIONS)  # one batch per condition, in CONDITIONS order
    as_is, zeroed, mean, shuffled, counterfactual, noise = spy_memory
    keys = [s.images[0] for s in samples]
    own = {}
    for row, key in enumerate(keys):
        own.setdefault(key, as_is[row])

    # as is: plain evaluate, bit for bit
    plain = evaluate(model, samples, batch_size=size, max_new_tokens=3)
    assert torch.equal(spy_memory[-1], as_is)
    assert result["as_is"] == plain["accuracy"]
    assert [p["raw"] for p in result["predictions"]["as_is"]] == [p["raw"] for p in plain["predictions"]]
    assert result["by_question_type"]["as_is"] == plain["by_question_type"]

    assert zeroed.shape == as_is.shape and (zeroed == 0).all()
    dataset_mean = torch.stack(list(own.values())).mean(0)  # each image once
    assert torch.allclose(mean, dataset_mean.expand_as(mean), atol=1e-6)
    assert (mean == mean[:1]).all()

    partner = {}
    for row, key in enumerate(keys):
        matches = [k for k, m in own.items() if torch.equal(shuffled[row], m)]
        assert len(matches) == 1 and matches[0] != key  # another image's memory, never its own
        assert partner.setdefault(key, matches[0]) == matches[0]  # the same image always gets the same partner
    assert sorted(partner.values()) == sorted(own)  # a permutation of the images

    images = [load_image(s.images[0], s) for s in samples]
    expected = model.memory(model.prior(images), "counterfactual", "zero")
    assert torch.allclose(counterfactual, expected, atol=1e-5) and not torch.allclose(counterfactual, as_is)

    rms = lambda m: m.pow(2).mean(dim=(1, 2)).sqrt()  # noqa: E731
    assert torch.allclose(rms(noise), rms(as_is), rtol=0.15)
    assert not torch.allclose(noise, as_is, atol=0.1 * float(rms(as_is).mean()))
    cosine = torch.nn.functional.cosine_similarity(noise.flatten(1), as_is.flatten(1), dim=1)
    assert cosine.abs().max() < 0.3  # replaced, not added
    again = reliance_report(model, samples, batch_size=5, max_new_tokens=3, conditions=("noise",))
    assert again["skipped"]["zeroed"] == "not requested" and again["zeroed"] is None
    assert torch.equal(torch.cat(spy_memory[-((size + 4) // 5):]), noise)  # seeded per sample, not per batch

    flat = torch.nn.functional.normalize(torch.stack(list(own.values())).flatten(1).double(), dim=1)
    sims = flat @ flat.T
    n = len(flat)
    assert result["collapse_cosine"] == pytest.approx(float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1))))


def test_encoder_free_student_or_plain_vlm_has_no_counterfactual(tiny_env, model, tmp_path):
    samples = _lesion_questions(tiny_env.test_file)[:2]
    hidden = model.vlm.config.text_config.hidden_size
    student = MedSynapseV(model.vlm, model.processor,
                          autonomous=AutonomousMemoryModule(AutonomousConfig(hidden_size=hidden, n_memory=4)))
    with pytest.raises(ValueError, match="encoder-free student"):
        evaluate(student, samples, branch="counterfactual", max_new_tokens=2)
    plain = MedSynapseV(model.vlm, model.processor)
    with pytest.raises(ValueError, match="plain VLM"):
        evaluate(plain, samples, branch="counterfactual", max_new_tokens=2)
    assert evaluate(plain, samples, max_new_tokens=2)["n"] == 2  # the base VLM's own (no) memory still runs
    report = reliance_report(student, samples, max_new_tokens=2, conditions=("counterfactual",))
    assert report["counterfactual"] is None and "encoder-free student" in report["skipped"]["counterfactual"]
    assert report["as_is"] is not None and report["memory_branch"] == "autonomous"
    with pytest.raises(ValueError, match="no memory"):
        reliance_report(plain, samples)
    with pytest.raises(ValueError, match="leak probe needs"):
        leak_probe(student, read_samples(tiny_env.train_file), read_samples(tiny_env.test_file))
    readable = readability_probes(student, read_samples(tiny_env.train_file), read_samples(tiny_env.test_file))
    assert set(readable) == {"vlm_visual_tokens", "autonomous_memory"}


# --- the report and the command -------------------------------------------------------------------------------
@pytest.mark.slow
def test_diagnose_command_writes_the_report(tiny_env, model, tmp_path, capsys):
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    samples = read_samples(tiny_env.test_file)
    two_images = sorted({s.images[0] for s in samples})[:2]
    data = tmp_path / "two_images.jsonl"  # image paths stay absolute
    write_samples(data, [s for s in samples if s.images[0] in two_images])
    out = tmp_path / "diag"
    code = main(["diagnose", "--model", str(folder), "--data", str(data), "--train-data",
                 str(tiny_env.train_file), "--output", str(out), "--batch-size", "64", "--families", "lesion",
                 "--max-new-tokens", "3"])
    assert code == 0
    result = json.loads((out / "diagnostics.json").read_text())
    reliance = result["reliance"]
    assert {*CONDITIONS, "collapse_cosine", "by_question_type", "n"} <= set(reliance)
    assert all(0.0 <= reliance[c] <= 1.0 for c in CONDITIONS)
    assert set(reliance["by_question_type"]) == set(CONDITIONS)
    assert reliance["n"] == len(_lesion_questions(data))
    leak = result["probes"]["leak"]
    assert {"memory", "counterfactual", "chance", "memory_ci95", "counterfactual_ci95", "by_label"} <= set(leak)
    assert set(result["probes"]["readability"]) == {"vlm_visual_tokens", "prior_tokens"}
    presence = result["probes"]["readability"]["vlm_visual_tokens"]
    assert {"accuracy", "ci95", "chance", "at_chance", "n_train", "n_test", "strength"} <= set(presence)
    assert presence["n_train"] == 12 and presence["n_test"] == 2
    assert result["n_skipped"] == len(result["skipped"])
    text = (out / "diagnostics.md").read_text()
    assert "| shuffled |" in text and "vlm_visual_tokens" in text
    assert "| zeroed |" in capsys.readouterr().out

    # without a train file the probes are skipped, and the report says so
    bare = diagnose(folder, data, output=tmp_path / "no_train", families=["lesion"],
                    max_new_tokens=2, batch_size=64, conditions=("zeroed",), model=model)
    assert bare == json.loads((tmp_path / "no_train" / "diagnostics.json").read_text())
    assert "skipped" in bare["probes"] and any(item["what"] == "probes" for item in bare["skipped"])
    assert bare["reliance"]["noise"] is None and bare["n_skipped"] == len(bare["skipped"]) == 5


def test_diagnose_bad_input_is_one_clear_line(tiny_env, tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert main(["diagnose", "--model", str(tmp_path), "--data", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.jsonl" in err[0] and "Traceback" not in err[0]
    with pytest.raises(DataError):
        main(["diagnose", "--model", str(tmp_path), "--data", str(missing), "--debug"])
    assert main(["diagnose", "--model", str(tmp_path / "nope"), "--data", str(tiny_env.test_file)]) == 2
    assert "nope" in capsys.readouterr().err
    general = tmp_path / "general_only.jsonl"  # probes' labels cannot come from it: refused before any generation
    write_samples(general, [s for s in read_samples(tiny_env.train_file) if s.family == "general"])
    assert main(["diagnose", "--model", str(tmp_path / "nope"), "--data", str(tiny_env.test_file),
                 "--train-data", str(general)]) == 2
    assert "general_only.jsonl" in capsys.readouterr().err


# --- what the leak probe reports, on features with a known answer (no model forward) -----------------------------
def _features_by_label(table, readable: bool) -> torch.Tensor:
    """One row per image: a one-hot of the largest lesion's quadrant (a fifth slot for none) when `readable`, else a
    constant row (nothing to read)."""
    rows = torch.zeros(len(table.paths), len(QUADRANTS) + 1)
    if readable:
        for i, quadrant in enumerate(table.location):
            rows[i, len(QUADRANTS) if quadrant is None else quadrant] = 1.0
    return rows


def test_leak_probe_reports_each_probe_it_ran_and_none_for_the_one_it_did_not(tiny_env, monkeypatch):
    from medsynapse.eval import diagnostics

    train = image_table(read_samples(tiny_env.train_file), tiny_env.train_file)
    test = image_table(read_samples(tiny_env.test_file), tiny_env.test_file)
    assert train.source == str(tiny_env.train_file) and test.source == str(tiny_env.test_file)

    def features(model, table, kinds, intervention="zero", batch_size=16, desc=""):
        return {k: _features_by_label(table, readable=k == "memory") for k in kinds}

    monkeypatch.setattr(diagnostics, "extract_features", features)
    monkeypatch.setattr(diagnostics, "has_prior_branch", lambda model: True)
    both = leak_probe(object(), train, test, intervention="reference")
    rows = [i for i, q in enumerate(test.location) if q is not None]
    train_rows = [i for i, q in enumerate(train.location) if q is not None]
    direct = {kind: linear_probe(_features_by_label(train, kind == "memory")[train_rows],
                                 [train.location[i] for i in train_rows],
                                 _features_by_label(test, kind == "memory")[rows], [test.location[i] for i in rows])
              for kind in ("memory", "counterfactual")}
    for kind in ("memory", "counterfactual"):
        assert both[kind] == direct[kind]["accuracy"] and both[f"{kind}_ci95"] == direct[kind]["ci95"]
        assert both[f"{kind}_above_chance"] == direct[kind]["above_chance"]
    assert both["memory"] > both["counterfactual"] and both["chance"] == direct["counterfactual"]["chance"]
    only_counterfactual = leak_probe(object(), train, test, intervention="reference", with_memory=False)
    assert only_counterfactual["counterfactual"] == both["counterfactual"]
    assert [only_counterfactual[f"memory{suffix}"] for suffix in ("", "_ci95", "_at_chance", "_above_chance")] == [
        None] * 4
    few = diagnostics.probe_label(torch.zeros(1, 2), replace_rows(train, 1), torch.zeros(1, 2), test, "presence")
    assert f"1 labelled train image(s) in {tiny_env.train_file}" in few["skipped"]


def replace_rows(table, n: int):
    """The table's first `n` images only."""
    from dataclasses import replace

    return replace(table, paths=table.paths[:n], samples=table.samples[:n], presence=table.presence[:n],
                   location=table.location[:n])
