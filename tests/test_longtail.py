"""Long-tailed split construction: exact published counts, determinism, class order, groups, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ltdd.data.longtail import LongTailSplit, class_groups, longtail_counts, make_longtail, probe_split
from ltdd.errors import LtddError

# lad.md §1.1 (CIFAR-10-LT, n_max 5000)
CIFAR10_LT = {
    10: (20431, [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500]),
    50: (13996, [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]),
    100: (12406, [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]),
    200: (11203, [5000, 2775, 1540, 854, 474, 263, 146, 81, 45, 25]),
}


@pytest.mark.parametrize("imbalance", sorted(CIFAR10_LT))
def test_cifar10_lt_counts(imbalance):
    total, counts = CIFAR10_LT[imbalance]
    got = longtail_counts(5000, 10, imbalance)
    assert got == counts and sum(got) == total
    # the same through the ratio spelling used by the reference configs (r = 1 / IF)
    assert longtail_counts(5000, 10, 1.0 / (1.0 / imbalance)) == counts


@pytest.mark.parametrize(
    "imbalance,total,tail",
    [(10, 19573, [52, 51, 50]), (20, 15907, [26, 25, 25]), (50, 12608, [10, 10, 10]), (100, 10847, [5, 5, 5])],
)
def test_cifar100_lt_counts(imbalance, total, tail):
    got = longtail_counts(500, 100, imbalance)
    assert sum(got) == total and got[0] == 500 and got[-3:] == tail


@pytest.mark.parametrize("imbalance,total,tail", [(10, 39072, 50), (20, 31711, 25), (100, 21549, 5)])
def test_tiny_imagenet_lt_counts(imbalance, total, tail):
    got = longtail_counts(500, 200, imbalance)
    assert sum(got) == total and got[0] == 500 and got[-1] == tail


@pytest.mark.parametrize(
    "imbalance,total,counts",
    [
        (100, 2478, [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]),
        (50, 2795, None),
        (10, 4084, None),
    ],
)
def test_two_stage_counts_n_max_1000(imbalance, total, counts):
    got = longtail_counts(1000, 10, imbalance)
    assert sum(got) == total
    if counts is not None:
        assert got == counts


def test_counts_edge_cases_and_step_profile():
    assert longtail_counts(7, 1, 100) == [7]
    assert longtail_counts(100, 10, 1) == [100] * 10
    assert longtail_counts(100, 2, 10) == [100, 10]
    assert longtail_counts(100, 4, 10, "step") == [100, 100, 10, 10]
    assert longtail_counts(100, 5, 10, "step") == [100, 100, 10, 10, 10]  # first C // 2 are major
    assert longtail_counts(100, 1, 10, "step") == [100]
    with pytest.raises(LtddError, match="profile"):
        longtail_counts(100, 10, 10, "linear")
    with pytest.raises(LtddError, match="imbalance_factor"):
        longtail_counts(100, 10, 0.5)
    with pytest.raises(LtddError):
        longtail_counts(0, 10, 10)


def _pool(per_class=(60, 60, 60, 60), seed=0):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(per_class)])
    return np.random.RandomState(seed).permutation(labels).astype(np.int64)


def test_make_longtail_counts_indices_and_determinism():
    labels = _pool((5000,) * 10)
    split = make_longtail(labels, 10, 100, seed=0)
    assert split.counts == CIFAR10_LT[100][1] and split.n_max == 5000 and len(split.indices) == 12406
    assert split.indices.dtype == np.int64 and np.all(np.diff(split.indices) > 0)
    assert np.bincount(labels[split.indices], minlength=10).tolist() == split.counts
    again = make_longtail(labels, 10, 100, seed=0)
    np.testing.assert_array_equal(split.indices, again.indices)
    other = make_longtail(labels, 10, 100, seed=1)
    assert other.counts == split.counts and not np.array_equal(other.indices, split.indices)
    # nested: the IF-100 split of a class is a subset of its IF-10 split (same seed)
    wider = make_longtail(labels, 10, 10, seed=0)
    assert set(split.indices.tolist()) <= set(wider.indices.tolist())


def test_make_longtail_max_per_class_and_availability():
    labels = _pool((60, 60, 60, 60))
    split = make_longtail(labels, 4, 10, max_per_class=40)
    assert split.n_max == 40 and split.counts == longtail_counts(40, 4, 10) == [40, 18, 8, 4]
    capped = make_longtail(labels, 4, 2, max_per_class=100)  # [100, 79, 62, 50] capped at 60 available
    assert capped.counts == [60, 60, 60, 50]
    uneven = make_longtail(_pool((30, 50, 40, 20)), 4, 5)  # n_max = largest class = 50
    assert uneven.n_max == 50 and uneven.counts == [30, 29, 17, 10]


def test_make_longtail_class_order():
    labels = _pool((50, 50, 50, 50))
    split = make_longtail(labels, 4, 10, class_order=[2, 0, 3, 1])
    targets = longtail_counts(50, 4, 10)
    assert split.class_order == [2, 0, 3, 1]
    assert split.counts[2] == targets[0] and split.counts[0] == targets[1]
    assert split.counts[3] == targets[2] and split.counts[1] == targets[3]
    groups = class_groups(split.counts, split.class_order)
    assert groups["head"] == [2] and groups["tail"] == [1]


def test_make_longtail_errors():
    labels = _pool((20, 20, 20))
    with pytest.raises(LtddError, match="imbalance_factor"):
        make_longtail(labels, 3, 0.5)
    with pytest.raises(LtddError, match="permutation"):
        make_longtail(labels, 3, 2, class_order=[0, 0, 1])
    with pytest.raises(LtddError, match="permutation"):
        make_longtail(labels, 3, 2, class_order=[0, 1])
    with pytest.raises(LtddError) as e:
        make_longtail(labels, 3, 100, class_names=["cat", "dog", "frog"])  # 20 / 100 -> 0
    assert "class 'frog' would have no training images" in str(e.value)
    with pytest.raises(LtddError, match="no training images"):
        make_longtail(np.array([0, 0, 1, 1]), 3, 1)  # class 2 absent
    with pytest.raises(LtddError, match="labels"):
        make_longtail(np.array([0, 5]), 3, 1)
    with pytest.raises(LtddError, match="seed"):
        make_longtail(labels, 3, 2, seed=-1)


def test_split_dict_round_trip_is_json():
    split = make_longtail(_pool((30, 30, 30)), 3, 3, seed=5)
    d = json.loads(json.dumps(split.to_dict()))
    back = LongTailSplit.from_dict(d)
    np.testing.assert_array_equal(back.indices, split.indices)
    assert back.counts == split.counts and back.class_order == split.class_order
    assert (back.imbalance_factor, back.profile, back.seed, back.n_max) == (3.0, "exp", 5, 30)
    d.pop("counts")
    with pytest.raises(LtddError, match="counts"):
        LongTailSplit.from_dict(d)


def test_probe_split_is_balanced_disjoint_and_deterministic():
    labels = _pool((100, 100, 100))
    split = make_longtail(labels, 3, 10)  # [100, 31, 10]
    probe = probe_split(labels, 3, split.indices, per_class=20, seed=0)
    assert not set(probe.tolist()) & set(split.indices.tolist())
    assert np.bincount(labels[probe], minlength=3).tolist() == [0, 20, 20]  # class 0 fully used
    np.testing.assert_array_equal(probe, probe_split(labels, 3, split.indices, per_class=20, seed=0))
    assert not np.array_equal(probe, probe_split(labels, 3, split.indices, per_class=20, seed=1))
    few = probe_split(labels, 3, split.indices, per_class=80)
    assert np.bincount(labels[few], minlength=3).tolist() == [0, 69, 80]
    assert probe_split(labels, 3, split.indices, per_class=0).size == 0


def test_class_groups_thirds_and_shots():
    counts = [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]  # the 2,478-image split
    g = class_groups(counts)
    assert g["head"] == [0, 1, 2] and g["medium"] == [3, 4, 5, 6] and g["tail"] == [7, 8, 9]
    assert g["many"] == [0, 1, 2, 3, 4] and g["medium_shot"] == [5, 6, 7] and g["few"] == [8, 9]
    g100 = class_groups(longtail_counts(500, 100, 100))
    assert [len(g100[k]) for k in ("head", "medium", "tail")] == [33, 34, 33]
    assert [len(g100[k]) for k in ("many", "medium_shot", "few")] == [35, 35, 30]  # field-notes §2.2
    c10 = class_groups(CIFAR10_LT[100][1])
    assert (len(c10["many"]), len(c10["medium_shot"]), len(c10["few"])) == (8, 2, 0)
    # boundaries: exactly 100 is medium, exactly 20 is medium
    b = class_groups([101, 100, 20, 19])
    assert b["many"] == [0] and b["medium_shot"] == [1, 2] and b["few"] == [3]
    # ranks follow counts when no order is given
    shuffled = class_groups([10, 1000, 599])
    assert shuffled["head"] == [1] and shuffled["tail"] == [0]
