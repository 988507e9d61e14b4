"""Expert Decoupling's initialisation wired end to end through the engine (lad.md §4.2-§4.3).

The experts here are real expert stores whose final weights are written by hand so that every prediction is known:

- a "quadrant" expert: the conv keeps the image (centre tap 1), instance norm + ReLU leave only the brightest
  quadrant, and classifier row k reads quadrant (k - shift) % 3 with weight ``scale``. On an image whose bright
  quadrant is q it predicts class (q + shift) % 3, with a logit that grows with ``scale``;
- a "bias" expert: every weight zero except the classifier bias, so its logits are that bias for every image.

The train images are dark 8x8 images with one bright quadrant (plus a little noise to make them distinct), so the
quadrant of each image decides what each expert predicts. Expected values come from running the same weights through
a plain ``nn.Module`` (not the engine's functional forward) and from tables written in the tests.
"""

from __future__ import annotations

import pytest
import torch

from ltdd.config import DistillConfig, ExpertConfig, PhaseConfig, TrainConfig
from ltdd.distill.engine import TrajectoryMatching
from ltdd.experts import Trajectory, TrajectoryStore
from ltdd.models import create_model
from ltdd.models.functional import ParamLayout

from conftest import TINY_MODEL, make_tiny_data


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _model():
    return create_model(TINY_MODEL.name, 3, 1, (8, 8), **TINY_MODEL.args)


def _zero_model():
    m = _model()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    return m.eval()


def quadrant_expert(scale=1.0, shift=0):
    m = _zero_model()
    with torch.no_grad():
        m.features[0].weight[0, 0, 1, 1] = 1.0  # channel 0 copies the image
        m.features[1].weight[0] = 1.0  # instance norm keeps channel 0 (the others stay 0)
        w = torch.zeros(3, 4, 4, 4)  # (class, channel, pooled h, pooled w)
        for k in range(3):
            q = (k - shift) % 3
            w[k, 0, 2 * (q // 2):2 * (q // 2) + 2, 2 * (q % 2):2 * (q % 2) + 2] = scale
        m.classifier.weight.copy_(w.reshape(3, -1))
    return m


def bias_expert(bias):
    m = _zero_model()
    with torch.no_grad():
        m.classifier.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return m


def marked_data(quadrants):
    """make_tiny_data's split (counts 12, 6, 3) with train images marked by a bright quadrant per image."""
    data = make_tiny_data()
    q = torch.tensor([x for per_class in quadrants for x in per_class])
    assert q.tolist() and len(q) == len(data.train_y)
    g = torch.Generator().manual_seed(1)
    x = 0.01 * torch.randn(len(q), 1, 8, 8, generator=g)
    for i, qi in enumerate(q.tolist()):
        x[i, 0, 4 * (qi // 2):4 * (qi // 2) + 4, 4 * (qi % 2):4 * (qi % 2) + 4] += 1.0
    data.train_x = x
    data.quadrant = q
    return data


def build_store(root, data, representation, classifier):
    """An expert store whose experts end at the given models' weights (the trajectories before that are random)."""
    layout = ParamLayout(_model())
    store = TrajectoryStore(root)
    cfg = ExpertConfig(model=TINY_MODEL, num_experts=max(len(representation), len(classifier)),
                       train=TrainConfig(epochs=2), classifier_train=TrainConfig(epochs=2, trainable="classifier"))
    store.initialise(cfg, data, layout)
    g = torch.Generator().manual_seed(0)
    for kind, models in (("representation", representation), ("classifier", classifier)):
        for i, m in enumerate(models):
            final = layout.flatten(m).detach().clone()
            rows = torch.stack([torch.randn(layout.total, generator=g), torch.randn(layout.total, generator=g), final])
            store.save(kind, i, Trajectory(rows, [0, 1, 2], final))
    return store


def engine(store, data, *, ipc, image_init, label_init="experts_correct", label_store="classifier", duplicate=True):
    ph = PhaseConfig(name="p", store="representation", min_start_epoch=0, max_start_epoch=1, syn_steps=1,
                     expert_epochs=1)
    cfg = DistillConfig(ipc=ipc, iterations=1, phases=[ph], image_init=image_init, label_init=label_init,
                        label_store=label_store, duplicate=duplicate, soft_labels=True, dsa=False)
    eng = TrajectoryMatching(cfg, data, experts_dir=store.root)
    eng.initialise()
    return eng


def logits(m, x):
    with torch.no_grad():
        return m(x)


def test_the_hand_made_experts_predict_what_they_are_built_to(tmp_path):
    """The premise of every test below, checked through the engine's own expert function."""
    data = marked_data([[0] * 6 + [1] * 6, [1, 1, 1, 0, 2, 2], [2, 0, 1]])
    store = build_store(tmp_path / "s", data, [quadrant_expert(shift=1)], [quadrant_expert(), bias_expert([0, 0, 4])])
    eng = engine(store, data, ipc=1, image_init="real")
    q = data.quadrant
    assert torch.equal(eng._expert_fn("classifier", 0)(data.train_x).argmax(1), q)
    assert torch.equal(eng._expert_fn("representation", 0)(data.train_x).argmax(1), (q + 1) % 3)
    assert torch.allclose(eng._expert_fn("classifier", 1)(data.train_x), torch.tensor([0.0, 0, 4]).expand(21, 3))
    hot = eng._expert_fn("classifier", 0)(data.train_x).max(1).values
    assert (hot > 5).all()  # a confident prediction, far from any tie


# ---- label_store: which experts initialise images and labels --------------------------------------------------

@pytest.mark.parametrize("label_store,shift", [("classifier", 0), ("representation", 1)])
def test_label_store_chooses_the_experts_for_images_and_soft_labels(tmp_path, label_store, shift):
    # class 0: quadrants 0 (right for the classifier experts) and 2 (right for the representation experts), ...
    data = marked_data([[0] * 6 + [2] * 6, [1, 1, 1, 0, 0, 0], [2, 1, 1]])
    rep, cls = quadrant_expert(scale=2.0, shift=1), quadrant_expert(scale=1.0, shift=0)
    store = build_store(tmp_path / "s", data, [rep], [cls])
    eng = engine(store, data, ipc=2, image_init="correct", label_store=label_store)
    used = cls if label_store == "classifier" else rep
    src = eng.init_sources
    assert -1 not in src
    labels = eng.labels.tolist()
    assert labels == [0, 0, 1, 1, 2, 2]
    # every chosen image is one the chosen store's expert classifies correctly
    assert [(int(data.quadrant[s]) + shift) % 3 for s in src] == labels
    assert all(int(data.train_y[s]) == y for s, y in zip(src, labels))
    # the soft labels are that expert's logits (it is right on all of them, so the average is its own)
    want = logits(used, eng.images.detach())
    assert torch.allclose(eng.soft.detach(), want, atol=1e-5)
    other = rep if used is cls else cls
    assert not torch.allclose(eng.soft.detach(), logits(other, eng.images.detach()), atol=1e-2)


def test_label_init_expert_takes_the_first_expert_of_the_label_store(tmp_path):
    data = marked_data([[0] * 12, [1] * 6, [2] * 3])
    store = build_store(tmp_path / "s", data, [bias_expert([7.0, 0, 0])],
                        [bias_expert([0, 0, 3.0]), bias_expert([0, 5.0, 0])])
    eng = engine(store, data, ipc=2, image_init="real", label_init="expert")
    assert torch.equal(eng.soft.detach(), torch.tensor([0.0, 0, 3]).expand(6, 3))  # unfiltered, first expert


# ---- soft labels: the average of the correct classifier experts -----------------------------------------------

def test_soft_labels_average_only_the_correct_classifier_experts(tmp_path):
    data = marked_data([[0] * 6 + [2] * 6, [1, 1, 0, 0, 2, 2], [2, 0, 1]])
    e0, e1, e2 = quadrant_expert(scale=1.0), quadrant_expert(scale=3.0), bias_expert([0, 0, 4.0])
    rep = bias_expert([0, 9.0, 0])  # predicts class 1 everywhere: must not be used
    store = build_store(tmp_path / "s", data, [rep], [e0, e1, e2])
    eng = engine(store, data, ipc=6, image_init="real")
    # (class, quadrant) -> the experts that classify such an image correctly
    correct = {(0, 0): [e0, e1], (0, 2): [], (1, 1): [e0, e1], (1, 0): [], (1, 2): [], (2, 2): [e0, e1, e2],
               (2, 0): [e2], (2, 1): [e2]}
    images, soft = eng.images.detach(), eng.soft.detach()
    seen = set()
    for i, s in enumerate(eng.init_sources):
        assert s >= 0 and torch.equal(images[i], data.train_x[s])
        key = (int(data.train_y[s]), int(data.quadrant[s]))
        seen.add(len(correct[key]))
        experts = correct[key]
        if experts:
            want = torch.stack([logits(e, images[i:i + 1])[0] for e in experts]).mean(0)
        else:
            want = torch.zeros(3)  # nobody is right: all-zero logits, a uniform label
        assert torch.allclose(soft[i], want, atol=1e-5), (i, key, soft[i], want)
    assert seen == {0, 1, 2, 3}  # the run met images with no, one, two and all three experts right
    # the uniform label is exactly zero, and it is not the correct experts' (or anybody's) logits
    none = [i for i, s in enumerate(eng.init_sources) if not correct[(int(data.train_y[s]), int(data.quadrant[s]))]]
    assert none and torch.equal(soft[none], torch.zeros(len(none), 3))
    assert torch.softmax(soft[none], 1).allclose(torch.full((len(none), 3), 1 / 3))


# ---- image_init: correct ------------------------------------------------------------------------------------------

def _correct_case(tmp_path):
    # class 0: 6 images right (quadrant 0), 6 wrong; class 1: 3 right (quadrant 1); class 2: none right
    data = marked_data([[0] * 6 + [1] * 6, [1, 1, 1, 0, 2, 2], [0, 1, 0]])
    # classifier expert 0 decides; expert 1 (always class 2) and the representation expert (quadrant + 1) must not
    store = build_store(tmp_path / "s", data, [quadrant_expert(shift=1)],
                        [quadrant_expert(), bias_expert([0, 0, 4.0])])
    return data, store


def test_image_init_correct_uses_the_first_classifier_expert_and_duplicates_cyclically(tmp_path):
    data, store = _correct_case(tmp_path)
    eng = engine(store, data, ipc=5, image_init="correct", duplicate=True)
    src, images = eng.init_sources, eng.images.detach()
    assert eng.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    right = {c: [i for i in range(len(data.train_y)) if data.train_y[i] == c and data.quadrant[i] == c]
             for c in range(3)}
    # class 0: five different images, all classified correctly
    assert len(set(src[:5])) == 5 and set(src[:5]) <= set(right[0])
    # class 1: only three are right: a, b, c, a, b (cyclic), and they are the three right ones
    a, b, c = src[5:8]
    assert sorted([a, b, c]) == right[1]
    assert src[5:10] == [a, b, c, a, b]
    # class 2: nobody right: noise (not a real image)
    assert src[10:] == [-1] * 5
    for i, s in enumerate(src):
        if s >= 0:
            assert torch.equal(images[i], data.train_x[s])
    noise = images[10:].flatten(1)
    assert (torch.cdist(noise, data.train_x.flatten(1)) > 1.0).all()
    assert noise.std() > 0.5


def test_image_init_correct_without_duplicate_fills_with_noise(tmp_path):
    data, store = _correct_case(tmp_path)
    dup = engine(store, data, ipc=5, image_init="correct", duplicate=True)
    eng = engine(store, data, ipc=5, image_init="correct", duplicate=False)
    src, images = eng.init_sources, eng.images.detach()
    assert src[5:8] == dup.init_sources[5:8]  # the same three found images...
    assert src[8:10] == [-1, -1]  # ...and noise instead of duplicates
    assert src[10:] == [-1] * 5
    assert not torch.equal(images[8], images[5]) and not torch.equal(images[9], images[6])
    assert (torch.cdist(images[8:10].flatten(1), data.train_x.flatten(1)) > 1.0).all()


def test_image_init_real_duplicates_a_short_class_cyclically(tmp_path):
    data = marked_data([[0] * 12, [1] * 6, [2] * 3])
    store = build_store(tmp_path / "s", data, [quadrant_expert()], [quadrant_expert()])
    eng = engine(store, data, ipc=7, image_init="real", duplicate=True)
    src = eng.init_sources
    assert len(set(src[:7])) == 7
    one = src[7:14]  # 6 images of class 1 for 7 slots
    assert sorted(one[:6]) == list(range(12, 18)) and one[6] == one[0]
    two = src[14:]
    assert sorted(two[:3]) == [18, 19, 20] and two == two[:3] * 2 + [two[0]]
    off = engine(store, data, ipc=7, image_init="real", duplicate=False).init_sources
    assert off[7:13] == one[:6] and off[13] == -1 and off[14:17] == two[:3] and off[17:] == [-1] * 4
