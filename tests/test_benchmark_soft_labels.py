"""benchmarks/soft_labels.py: per-class label confidence and probability mass of a distilled set."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from ltdd.errors import LtddError
from ltdd.synset import SyntheticSet

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "soft_labels.py"


def _module():
    spec = importlib.util.spec_from_file_location("soft_labels_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_profile_of_known_logits():
    mod = _module()
    # 2 classes x 2 images; class 0's images are sure of class 0, class 1's split 50/50
    big = 50.0
    logits = torch.tensor([[big, 0.0], [big, 0.0], [0.0, 0.0], [0.0, 0.0]])
    own, mass = mod.label_profile(SyntheticSet(torch.zeros(4, 1, 2, 2), torch.tensor([0, 0, 1, 1]), logits))
    assert own == pytest.approx([1.0, 0.5])
    assert mass == pytest.approx([1.5, 0.5])  # class 0 gets 2 + 2*0.5 = 3 of 4 probability units; IPC 2
    assert math.isclose(sum(mass), 2.0)


def test_hard_labels_are_refused():
    with pytest.raises(LtddError, match="hard labels"):
        _module().label_profile(SyntheticSet(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1])))
