"""Stage II's reward pieces by value: accuracy rewards, the paper's composite R with and without the gate, and the
causal reward's reductions."""

from __future__ import annotations

import pytest
import torch

from medsynapse.data.schema import Sample
from medsynapse.objectives.rewards import accuracy_rewards, causal_rewards, composite_reward, total_reward


def _sample(answer: str, answer_type: str, options: dict | None = None) -> Sample:
    return Sample(id="s", images=["x.png"], question="q", answer=answer, answer_type=answer_type,
                  options=options or {})


def test_accuracy_rewards_by_value():
    choice = {"A": "left", "B": "right", "C": "both"}
    samples = [_sample("yes", "yes_no"), _sample("yes", "yes_no"), _sample("B", "multiple_choice", choice),
               _sample("B", "multiple_choice", choice), _sample("no", "yes_no"),
               _sample("B", "multiple_choice", choice)]
    texts = ["Yes.", "no", "B", "A", "I cannot tell", "(B) right"]
    expected = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]  # unparseable scores 0
    assert accuracy_rewards(texts, samples).tolist() == expected


def test_paper_reward_and_its_gate_by_value():
    r_acc = torch.tensor([1.0, 0.0, 1.0, 0.0])
    r_causal = torch.tensor([0.4, -0.2, -0.6, 0.8])
    torch.testing.assert_close(total_reward(r_acc, r_causal), torch.tensor([1.2, -0.1, 0.7, 0.4]))
    torch.testing.assert_close(total_reward(r_acc, r_causal, 2.0, 0.25), torch.tensor([2.1, -0.05, 1.85, 0.2]))
    # the gate credits r_causal to correct rollouts only
    torch.testing.assert_close(total_reward(r_acc, r_causal, gate="correct"), torch.tensor([1.2, 0.0, 0.7, 0.0]))
    torch.testing.assert_close(composite_reward(r_acc, r_causal, "paper", 1.0, 0.5, "correct"),
                               torch.tensor([1.2, 0.0, 0.7, 0.0]))
    with pytest.raises(ValueError, match="causal gate"):
        total_reward(r_acc, r_causal, gate="wrong")
    with pytest.raises(ValueError, match=r"ranks correct rollouts first \(set causal_gate: none\)$"):
        composite_reward(r_acc, r_causal, "ranked", 1.0, 0.5, "correct")


def test_causal_reward_reductions_and_clip_by_value():
    factual = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    counterfactual = torch.tensor([[-2.0, -2.5, -1.0], [-1.5, -3.5, -0.1]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 1's last token is after EOS
    torch.testing.assert_close(causal_rewards(factual, counterfactual, mask), torch.tensor([-0.5, 4.0]))
    torch.testing.assert_close(causal_rewards(factual, counterfactual, mask, "mean"), torch.tensor([-0.5 / 3, 2.0]))
    torch.testing.assert_close(causal_rewards(factual, counterfactual, mask, clip=1.5), torch.tensor([-0.5, 1.5]))
