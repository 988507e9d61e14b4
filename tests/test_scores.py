"""DD-Ranking's scores (LRS, ARS) against numbers worked out by hand, and their assembly from evaluation results."""

from __future__ import annotations

import math

import pytest

from ltdd.errors import LtddError
from ltdd.scores import (augmentation_robust_score, label_robust_score, normalise, scores_from_results,
                         without_augmentation)

# e = 2.718281828, 1/e = 0.367879441, e - 1/e = 2.350402387
# a = 0:     (1 - 0.367879441) / 2.350402387 = 0.268941421 (= 1 / (1 + e))
# a = 0.125: e^0.125 = 1.133148453; (1.133148453 - 0.367879441) / 2.350402387 = 0.325590638
# a = -0.2:  e^-0.2 = 0.818730753; (0.818730753 - 0.367879441) / 2.350402387 = 0.191818777


def test_normalisation_by_hand():
    assert normalise(0.0) == pytest.approx(0.268941421, abs=1e-9)
    assert normalise(0.125) == pytest.approx(0.325590638, abs=1e-9)
    assert normalise(-0.2) == pytest.approx(0.191818777, abs=1e-9)
    assert normalise(1.0) == pytest.approx(1.0) and normalise(-1.0) == pytest.approx(0.0, abs=1e-12)


def test_lrs_by_hand():
    # full 50 %, distilled with hard labels 45 %, distilled under its protocol 60 %, random subset 30 %:
    # HLR = 0.50 - 0.45 = 0.05, IOR = 0.60 - 0.30 = 0.30, a = 0.5 * 0.30 - 0.5 * 0.05 = 0.125 -> LRS 0.325590638
    r = label_robust_score(0.50, 0.45, 0.60, 0.30)
    assert r["hlr"] == pytest.approx(0.05) and r["ior"] == pytest.approx(0.30)
    assert r["a"] == pytest.approx(0.125)
    assert r["lrs"] == pytest.approx(0.325590638, abs=1e-9)
    # HLR 0.2, IOR 0.2 -> a = 0 -> 1 / (1 + e)
    assert label_robust_score(0.60, 0.40, 0.55, 0.35)["lrs"] == pytest.approx(0.268941421, abs=1e-9)
    # w = 0.2: a = 0.2 * 0.30 - 0.8 * 0.05 = 0.02
    assert label_robust_score(0.50, 0.45, 0.60, 0.30, w=0.2)["a"] == pytest.approx(0.02)
    # the extremes: a = 1 (IOR 1, HLR -1) and a = -1 (IOR -1, HLR 1)
    assert label_robust_score(0.0, 1.0, 1.0, 0.0)["lrs"] == pytest.approx(1.0)
    assert label_robust_score(1.0, 0.0, 0.0, 1.0)["lrs"] == pytest.approx(0.0, abs=1e-12)


def test_ars_by_hand():
    # gain with augmentation 0.60 - 0.40 = 0.20, without 0.50 - 0.45 = 0.05; b = 0.5 * 0.2 + 0.5 * 0.05 = 0.125
    r = augmentation_robust_score(0.60, 0.40, 0.50, 0.45)
    assert r["gain_aug"] == pytest.approx(0.20) and r["gain_noaug"] == pytest.approx(0.05)
    assert r["b"] == pytest.approx(0.125) and r["ars"] == pytest.approx(0.325590638, abs=1e-9)
    # gamma = 1: only the augmented gain counts, b = 0.2
    assert augmentation_robust_score(0.60, 0.40, 0.50, 0.45, gamma=1.0)["ars"] == pytest.approx(
        (math.exp(0.2) - math.exp(-1)) / (math.e - math.exp(-1)))


def test_percentages_are_refused():
    with pytest.raises(LtddError, match="fraction"):
        label_robust_score(50.0, 45.0, 60.0, 30.0)
    with pytest.raises(LtddError, match="fraction"):
        augmentation_robust_score(0.6, 0.4, 50.0, 0.45)
    with pytest.raises(LtddError, match="w"):
        label_robust_score(0.5, 0.4, 0.6, 0.3, w=1.5)


def _summary(acc, per_class, head, tail):
    return {"summary": {"accuracy": {"mean": acc, "std": 0.0}, "per_class": per_class,
                        "groups": {"head": {"mean": head, "std": 0.0}, "tail": {"mean": tail, "std": 0.0}}}}


def test_scores_from_results_per_class_and_groups():
    full = _summary(0.50, [0.9, 0.1], 0.9, 0.1)
    syn_hard = _summary(0.45, [0.7, 0.2], 0.7, 0.2)
    syn = _summary(0.60, [0.8, 0.4], 0.8, 0.4)
    rnd = _summary(0.30, [0.6, 0.0], 0.6, 0.0)
    s = scores_from_results(full_hard=full, syn_hard=syn_hard, syn_own=syn, rnd_own=rnd)
    assert s["lrs"]["overall"]["lrs"] == pytest.approx(0.325590638, abs=1e-9)
    # class 0: HLR 0.2, IOR 0.2 -> a 0; class 1: HLR -0.1, IOR 0.4 -> a = 0.2 + 0.05 = 0.25
    assert s["lrs"]["per_class"]["a"] == pytest.approx([0.0, 0.25])
    assert s["lrs"]["per_class"]["lrs"][0] == pytest.approx(0.268941421, abs=1e-9)
    assert s["lrs"]["groups"]["head"]["a"] == pytest.approx(0.0)
    assert s["lrs"]["groups"]["tail"]["a"] == pytest.approx(0.25)
    assert "ars" not in s
    s2 = scores_from_results(full_hard=full, syn_hard=syn_hard, syn_own=syn, rnd_own=rnd, syn_aug=0.6, rnd_aug=0.4,
                             syn_noaug=0.5, rnd_noaug=0.45, full_crt=_summary(0.55, [0.8, 0.3], 0.8, 0.3))
    assert s2["ars"]["overall"]["b"] == pytest.approx(0.125)
    assert s2["lrs_crt"]["overall"]["hlr"] == pytest.approx(0.10)  # 0.55 - 0.45
    with pytest.raises(LtddError, match="ARS needs all four"):
        scores_from_results(full_hard=full, syn_hard=syn_hard, syn_own=syn, rnd_own=rnd, syn_aug=0.6)
    with pytest.raises(LtddError, match="not available"):
        scores_from_results(full_hard=full, syn_hard=syn_hard, syn_own=syn,
                            rnd_own={"status": "n/a", "reason": "no soft labels"})


def test_without_augmentation_turns_off_dsa_and_cutmix():
    from ltdd.config import protocol_preset

    p = without_augmentation(protocol_preset("relabel_cpu"))
    assert p.train.dsa is False and p.relabel.cutmix == 0.0
    assert protocol_preset("relabel_cpu").relabel.cutmix == 1.0  # the preset itself is unchanged
    assert without_augmentation(protocol_preset("lad")).train.dsa is False
