"""The trajectory-matching engine: gradients (exact vs finite differences, constant-memory vs its definition),
masks, phases, initialisation, resume and guards."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from ltdd.config import DistillConfig, PhaseConfig, RunConfig
from ltdd.distill import DivergenceError, distill
from ltdd.distill.engine import TrajectoryMatching, phase_replace
from ltdd.distill.init import init_images, init_soft_labels
from ltdd.errors import LtddError
from ltdd.models.functional import functional_forward


def _engine(store, data, *, gradient="exact", steps=3, match="all", update="all", inner="soft_ce", dsa=False,
            phases=None, **kw):
    ph = PhaseConfig(name="p", store="representation", min_start_epoch=0, max_start_epoch=2, syn_steps=steps,
                     expert_epochs=2, match=match, inner_loss=inner, student_update=update)
    cfg = DistillConfig(ipc=2, iterations=4, phases=phases or [ph], gradient=gradient, image_init="real",
                        soft_labels=True, label_init="onehot", onehot_scale=3.0, dsa=dsa,
                        dsa_strategy="color_crop_cutout_flip_scale_rotate", lr_init=0.05, **kw)
    eng = TrajectoryMatching(cfg, data, experts_dir=store.root)
    eng.initialise()
    return eng


def _to_double(eng):
    eng.model.double()
    eng.masks = {k: v.double() for k, v in eng.masks.items()}
    eng.class_weights = eng.class_weights.double()
    eng.images = eng.images.detach().double().requires_grad_(True)
    eng.soft = eng.soft.detach().double().requires_grad_(True)
    eng.lr = eng.lr.detach().double().requires_grad_(True)
    return eng


def _fixed(eng, t=0):
    ph = eng.cfg.phases[0]
    traj = eng._trajectory(ph.store, 0)
    return ph, traj.at(t).double(), traj.at(t + ph.expert_epochs).double(), eng._plan(ph)


@pytest.mark.parametrize("inner", ["soft_ce", "dam"])
def test_exact_gradient_matches_finite_differences(tiny_store, tiny_data, inner):
    eng = _to_double(_engine(tiny_store, tiny_data, steps=3, inner=inner))
    ph, th0, tgt, plan = _fixed(eng)
    # shrink the problem for gradcheck: only 4 images take part
    plan = [(idx[:4], aug) for idx, aug in plan]

    def f(images, soft, lr):
        return eng._phase_exact(ph, th0, tgt, plan, images, soft, lr)

    assert torch.autograd.gradcheck(f, (eng.images, eng.soft, eng.lr), eps=1e-6, atol=1e-5, rtol=1e-3)


def _grads_constant_memory(eng, ph, th0, tgt, plan):
    for t in (eng.images, eng.soft, eng.lr):
        t.grad = None
    loss = eng._phase_constant_memory(ph, th0, tgt, plan, eng.images, eng.soft, eng.lr, 1.0)
    return loss, eng.images.grad.clone(), eng.soft.grad.clone(), eng.lr.grad.clone()


def _grads_exact(eng, ph, th0, tgt, plan):
    loss = eng._phase_exact(ph, th0, tgt, plan, eng.images, eng.soft, eng.lr)
    gi, gs, gl = torch.autograd.grad(loss, (eng.images, eng.soft, eng.lr))
    return loss, gi, gs, gl


@pytest.mark.parametrize("match,update", [("all", "all"), ("backbone", "all"), ("all", "classifier")])
def test_constant_memory_equals_exact_for_one_step(tiny_store, tiny_data, match, update):
    eng = _to_double(_engine(tiny_store, tiny_data, steps=1, match=match, update=update, inner="dam"))
    ph, th0, tgt, plan = _fixed(eng, t=1)
    le, gi_e, gs_e, gl_e = _grads_exact(eng, ph, th0, tgt, plan)
    lc, gi_c, gs_c, gl_c = _grads_constant_memory(eng, ph, th0, tgt, plan)
    assert torch.allclose(le, lc)
    for a, b in ((gi_e, gi_c), (gs_e, gs_c), (gl_e, gl_c)):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_constant_memory_is_the_frozen_trajectory_gradient(tiny_store, tiny_data):
    """For N > 1 the constant-memory gradient equals the exact gradient of the surrogate in which every theta_j is
    detached (the documented dropped terms), and differs from the full unroll."""
    eng = _to_double(_engine(tiny_store, tiny_data, steps=4, inner="soft_ce"))
    ph, th0, tgt, plan = _fixed(eng)
    upd, m = eng.masks[ph.student_update], eng.masks[ph.match]

    # the surrogate, written independently
    theta = th0.clone()
    gs = []
    for idx, aug in plan:
        th = theta.detach().requires_grad_(True)
        out = functional_forward(eng.model, eng.layout, th, eng._batch(eng.images, idx, aug))
        g = torch.autograd.grad(eng._inner_loss(ph, out, idx, eng.soft), th, create_graph=True)[0] * upd
        gs.append(g)
        theta = (th - eng.lr.detach() * g).detach()
    G = torch.stack(gs).sum(0)
    surrogate = ((th0 - eng.lr * G - tgt) * m).pow(2).sum() / ((th0 - tgt) * m).pow(2).sum()
    gi_s, gs_s, gl_s = torch.autograd.grad(surrogate, (eng.images, eng.soft, eng.lr))

    lc, gi_c, gs_c, gl_c = _grads_constant_memory(eng, ph, th0, tgt, plan)
    assert torch.allclose(surrogate.detach(), lc)
    assert torch.allclose(gi_s, gi_c, rtol=1e-7, atol=1e-12)
    assert torch.allclose(gs_s, gs_c, rtol=1e-7, atol=1e-12)
    # the loss value is exact in both modes (same student trajectory); the gradients differ by the dropped terms
    le, gi_e, _, _ = _grads_exact(eng, ph, th0, tgt, plan)
    assert torch.allclose(le, lc)
    assert not torch.allclose(gi_e, gi_c, rtol=1e-3)
    cos = torch.nn.functional.cosine_similarity(gi_e.flatten(), gi_c.flatten(), dim=0)
    assert cos > 0.5  # an approximation, not noise


def test_matched_and_updated_coordinates(tiny_store, tiny_data):
    eng = _to_double(_engine(tiny_store, tiny_data, steps=2, match="backbone", update="classifier"))
    ph, th0, tgt, plan = _fixed(eng)
    base = eng._phase_exact(ph, th0, tgt, plan, eng.images, eng.soft, eng.lr)
    # the classifier part of the target is not matched
    tgt2 = tgt + 5.0 * eng.masks["classifier"]
    assert torch.allclose(base, eng._phase_exact(ph, th0, tgt2, plan, eng.images, eng.soft, eng.lr))
    # only the classifier moves during the inner steps, so the backbone distance is the expert's own
    num = ((th0 - tgt) * eng.masks["backbone"]).pow(2).sum()
    assert torch.allclose(base, num / num)


@pytest.mark.parametrize("gradient", ["exact", "constant_memory"])
def test_phases_are_summed_with_their_weights(tiny_store, tiny_data, gradient):
    ph_a = PhaseConfig(name="a", store="representation", max_start_epoch=2, syn_steps=2, match="backbone",
                       inner_loss="dam", weight=0.5)
    ph_b = PhaseConfig(name="b", store="classifier", max_start_epoch=2, syn_steps=2, student_update="classifier",
                       weight=2.0)
    eng = _engine(tiny_store, tiny_data, phases=[ph_a, ph_b], gradient=gradient)
    params = (eng.images, eng.soft, eng.lr)
    rng = (eng.py_rng.getstate(), eng.generator.get_state(), copy.deepcopy(eng.expert_order), dict(eng.expert_pos))
    # each phase alone with weight 1, drawing the same experts, start epochs and minibatches as step() will
    alone = []
    for ph in (ph_a, ph_b):
        for t in params:
            t.grad = None
        loss, info = eng.phase_loss_and_grads(phase_replace(ph, weight=1.0), 0)
        alone.append((loss, info, [t.grad.clone() for t in params]))
    eng.py_rng.setstate(rng[0])
    eng.generator.set_state(rng[1])
    eng.expert_order, eng.expert_pos = rng[2], rng[3]
    rec = eng.step(0)
    (la, ia, ga), (lb, ib, gb) = alone
    assert (rec["start/a"], rec["start/b"]) == (ia["start_epoch"], ib["start_epoch"])
    assert rec["loss/a"] == pytest.approx(la, rel=1e-6) and rec["loss/b"] == pytest.approx(lb, rel=1e-6)
    assert rec["loss"] == pytest.approx(0.5 * la + 2.0 * lb, rel=1e-6)
    for t, a, b in zip(params, ga, gb):  # step() leaves the summed gradient in .grad
        assert a.abs().sum() > 0 and b.abs().sum() > 0
        assert torch.allclose(t.grad, 0.5 * a + 2.0 * b, rtol=1e-4, atol=1e-7)
        assert not torch.allclose(t.grad, a + b, rtol=1e-3)
    assert rec["lr"] > 0


def test_sequential_generation_bound(tiny_store, tiny_data):
    eng = _engine(tiny_store, tiny_data)
    ph = PhaseConfig(min_start_epoch=0, max_start_epoch=20, current_max_start_epoch=10, expansion_end_iteration=100)
    assert eng.start_epoch_bound(ph, 0) == 10
    assert eng.start_epoch_bound(ph, 50) == 15
    assert eng.start_epoch_bound(ph, 1000) == 20
    # the upstream crash: an empty window [0, 0) becomes [0, 1)
    assert eng.start_epoch_bound(PhaseConfig(min_start_epoch=0, max_start_epoch=1, current_max_start_epoch=0,
                                             expansion_end_iteration=100), 0) == 1


def test_phase_window_checked_against_store(tiny_store, tiny_data):
    with pytest.raises(LtddError, match="exceed"):
        _engine(tiny_store, tiny_data, phases=[PhaseConfig(max_start_epoch=4, expert_epochs=2)])


def test_init_images_duplicates_short_classes(tiny_data):
    g = torch.Generator().manual_seed(0)
    images, labels, src = init_images(tiny_data, 5, "real", generator=g, duplicate=True)
    assert labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert len(set(src[:5])) == 5 and len(set(src[5:10])) == 5  # classes with >= 5 images: no repeats
    assert all(tiny_data.train_y[s] == c for c, s in zip(labels.tolist(), src))
    tail = src[10:]  # class 2 has 3 images (indices 18, 19, 20): a, b, c, a, b
    assert sorted(tail[:3]) == [18, 19, 20]
    assert tail == [tail[0], tail[1], tail[2], tail[0], tail[1]]
    for i, s in enumerate(src):
        assert torch.equal(images[i], tiny_data.train_x[s])
    images2, _, src2 = init_images(tiny_data, 5, "real", generator=torch.Generator().manual_seed(0),
                                   duplicate=False)
    assert src2[:13] == src[:13]  # the same images where there are enough...
    assert src2[13:] == [-1, -1]  # ...and noise instead of the duplicates
    assert not any(torch.equal(images2[i], x) for i in (13, 14) for x in tiny_data.train_x)


def test_init_correct_only_and_soft_label_average(tiny_data):
    # a "classifier" that is right only on class 0 and 1
    def classify(x):
        out = torch.zeros(len(x), 3)
        out[:, 0] = 1.0
        return out

    g = torch.Generator().manual_seed(0)
    images, labels, src = init_images(tiny_data, 2, "correct", generator=g, classify=classify)
    assert all(s >= 0 for s in src[:2]) and all(s == -1 for s in src[2:])  # only class 0 found
    e1 = lambda x: torch.tensor([[2.0, 0, 0], [0, 0, 1.0]])  # noqa: E731
    e2 = lambda x: torch.tensor([[4.0, 0, 0], [0, 3.0, 0]])  # noqa: E731
    y = init_soft_labels(torch.zeros(2, 1), torch.tensor([0, 1]), 3, "experts_correct", [e1, e2])
    assert torch.allclose(y[0], torch.tensor([3.0, 0, 0]))  # both right: average
    assert torch.allclose(y[1], torch.tensor([0.0, 3.0, 0]))  # only e2 right


def _run_cfg(dsa=True, iterations=6):
    ph1 = PhaseConfig(name="rep", store="representation", max_start_epoch=2, syn_steps=2, match="backbone",
                      inner_loss="dam", weight=0.5)
    ph2 = PhaseConfig(name="cls", store="classifier", max_start_epoch=1, syn_steps=2, student_update="classifier")
    d = DistillConfig(ipc=2, iterations=iterations, phases=[ph1, ph2], image_init="real", label_init="experts_correct",
                      dsa=dsa, checkpoint_every=2, lr_img=10.0)
    return RunConfig(distill=d, protocol="cpu")


def test_resume_equals_uninterrupted(tmp_path, tiny_store, tiny_data):
    cfg = _run_cfg()
    distill(cfg, tiny_data, tmp_path / "a", experts_dir=tiny_store.root, progress=False, evaluate=False)
    stopped = distill(cfg, tiny_data, tmp_path / "b", experts_dir=tiny_store.root, progress=False, evaluate=False,
                      stop_after=3)
    assert stopped == {"stopped_at": 3}
    with pytest.raises(LtddError, match="--resume"):
        distill(cfg, tiny_data, tmp_path / "b", experts_dir=tiny_store.root, progress=False, evaluate=False)
    distill(cfg, tiny_data, tmp_path / "b", experts_dir=tiny_store.root, progress=False, evaluate=False,
            resume=True)
    from ltdd.synset import SyntheticSet

    a, b = SyntheticSet.load(tmp_path / "a"), SyntheticSet.load(tmp_path / "b")
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.soft_labels, b.soft_labels)
    assert a.lr == b.lr
    la = (tmp_path / "a" / "log.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert len(la) == len(lb) == 6
    strip = lambda s: {k: v for k, v in __import__("json").loads(s).items() if k not in ("seconds", "peak_memory_mb")}  # noqa: E731
    assert [strip(s) for s in la] == [strip(s) for s in lb]


def test_guard_stops_on_exploding_step_size(tmp_path, tiny_store, tiny_data):
    cfg = _run_cfg(dsa=False)
    cfg.distill.lr_explode_factor = 0.5  # any step size above half the initial one counts as exploded
    with pytest.raises(DivergenceError, match="iteration"):
        distill(cfg, tiny_data, tmp_path / "c", experts_dir=tiny_store.root, progress=False, evaluate=False)
    assert (tmp_path / "c" / "checkpoint.safetensors").exists()  # the last good checkpoint stays
    assert not (tmp_path / "c" / "distilled.safetensors").exists()


def test_guard_stops_on_nan(tmp_path, tiny_store, tiny_data):
    cfg = _run_cfg(dsa=False)
    cfg.distill.lr_img = float("nan")
    with pytest.raises(DivergenceError, match="NaN"):
        distill(cfg, tiny_data, tmp_path / "d", experts_dir=tiny_store.root, progress=False, evaluate=False)


def test_store_mismatch_is_refused(tmp_path, tiny_store, tiny_data):
    other = dataclasses.replace(tiny_data, name="other") if dataclasses.is_dataclass(tiny_data) else tiny_data
    other.name = "other"
    with pytest.raises(LtddError, match="different data"):
        _engine(tiny_store, other)


@pytest.mark.parametrize("inner,soft", [("ce", True), ("soft_ce", False)])
def test_inner_loss_must_fit_the_label_kind(tiny_store, tiny_data, inner, soft):
    """Hard CE on a set that learns soft labels would never update them; soft CE without soft labels has none."""
    ph = PhaseConfig(max_start_epoch=2, syn_steps=1, inner_loss=inner)
    cfg = DistillConfig(ipc=1, phases=[ph], image_init="real", label_init="onehot", soft_labels=soft)
    with pytest.raises(LtddError, match="inner_loss"):
        TrajectoryMatching(cfg, tiny_data, experts_dir=tiny_store.root)


def test_an_expert_that_does_not_move_is_an_error(tiny_store, tiny_data):
    eng = _to_double(_engine(tiny_store, tiny_data, steps=1))
    ph, th0, _, plan = _fixed(eng)
    with pytest.raises(LtddError, match="does not move"):
        eng._phase_exact(ph, th0, th0.clone(), plan, eng.images, eng.soft, eng.lr)


def test_sequential_generation_must_start_inside_the_window(tiny_store, tiny_data):
    """A growing start window that begins beyond its end would draw start epochs the experts do not have."""
    ph = PhaseConfig(max_start_epoch=1, current_max_start_epoch=3, expansion_end_iteration=10, syn_steps=1)
    with pytest.raises(LtddError, match="current_max_start_epoch"):
        _engine(tiny_store, tiny_data, phases=[ph])


def test_segment_loss_is_one_at_step_size_zero_and_matches_one_plain_sgd_step(tiny_store, tiny_data):
    """The diagnostic behind benchmarks/mtt_step_size.py: with step size 0 the student does not move (loss exactly
    1); with one step it equals ||theta_0 - lr grad CE(theta_0) - theta_T||^2 / ||theta_0 - theta_T||^2 written in
    plain torch; it updates nothing and leaves the generator where it was."""
    import torch.nn.functional as F

    ph = PhaseConfig(name="p", store="representation", min_start_epoch=0, max_start_epoch=2, syn_steps=1,
                     expert_epochs=2, inner_loss="ce")
    eng = TrajectoryMatching(DistillConfig(ipc=2, iterations=1, phases=[ph], image_init="real", soft_labels=False,
                                           dsa=False),
                             tiny_data, experts_dir=tiny_store.root)
    eng.initialise()
    eng.images = eng.images.detach().double()
    eng.model.double()
    eng.masks = {k: v.double() for k, v in eng.masks.items()}
    ph = eng.cfg.phases[0]
    before = (eng.images.clone(), float(eng.lr.detach()), eng.generator.get_state().clone())
    assert eng.segment_loss("p", 0, 1, 0.0) == 1.0
    traj = eng._trajectory(ph.store, 0)
    th0, tgt = traj.at(1).double(), traj.at(1 + ph.expert_epochs).double()
    theta = th0.clone().requires_grad_(True)
    logits = functional_forward(eng.model, eng.layout, theta, eng.images)
    g = torch.autograd.grad(F.cross_entropy(logits, eng.labels), theta)[0]
    for lr in (0.05, 3.0):
        want = float((th0 - lr * g - tgt).pow(2).sum() / (th0 - tgt).pow(2).sum())
        assert eng.segment_loss("p", 0, 1, lr) == pytest.approx(want, rel=1e-9)
    assert torch.equal(eng.images, before[0]) and float(eng.lr.detach()) == before[1]
    assert torch.equal(eng.generator.get_state(), before[2])
    with pytest.raises(LtddError, match="no phase 'q'"):
        eng.segment_loss("q", 0, 1, 0.1)
