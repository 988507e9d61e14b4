"""Shared fixtures: a tiny in-memory dataset and a tiny hand-made expert store (no training needed)."""

from __future__ import annotations


import pytest
import torch

from ltdd.config import ExpertConfig, ModelConfig, TrainConfig
from ltdd.data import PreparedData
from ltdd.experts import TrajectoryStore, Trajectory
from ltdd.models import create_model
from ltdd.models.functional import ParamLayout

TINY_MODEL = ModelConfig("convnet", {"width": 4, "depth": 1})


@pytest.fixture
def one_thread():
    """For tiny problems: one intra-op thread avoids OpenMP thrashing on a busy shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Identity:
    def to_pixels(self, x):
        return (x - x.min()) / (x.max() - x.min() + 1e-8)

    def config(self):
        return {"kind": "identity"}


def make_tiny_data(num_classes=3, counts=(12, 6, 3), im=8, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    ys = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    # class-dependent mean so that the classes are separable
    means = torch.randn(num_classes, channels, im, im, generator=g)
    xs = means[ys] + 0.5 * torch.randn(len(ys), channels, im, im, generator=g)
    ty = torch.arange(num_classes).repeat_interleave(5)
    tx = means[ty] + 0.5 * torch.randn(len(ty), channels, im, im, generator=g)
    data = PreparedData.from_tensors(xs, ys, tx, ty, name="tiny", class_names=[f"c{i}" for i in range(num_classes)],
                                     num_classes=num_classes, preprocessor=_Identity())
    data.groups = {"head": [0], "medium": [1], "tail": [2]}
    return data


@pytest.fixture
def tiny_data():
    return make_tiny_data()


def make_store(root, data, epochs=4, n_experts=2, model_cfg=TINY_MODEL, classifier=True, seed=0):
    """A store whose trajectories are random walks in parameter space (classifier experts move only the head)."""
    model = create_model(model_cfg.name, data.num_classes, data.channels, data.im_size, **model_cfg.args)
    layout = ParamLayout(model)
    cfg = ExpertConfig(model=model_cfg, num_experts=n_experts, train=TrainConfig(epochs=epochs),
                       classifier_train=TrainConfig(epochs=epochs, trainable="classifier"))
    store = TrajectoryStore(root)
    store.initialise(cfg, data, layout)
    g = torch.Generator().manual_seed(seed)
    cls_mask = layout.mask("classifier").float()
    for i in range(n_experts):
        start = layout.flatten(model).detach().clone() + 0.1 * torch.randn(layout.total, generator=g)
        steps = 0.05 * torch.randn(epochs, layout.total, generator=g)
        rows = torch.cat([start[None], start[None] + steps.cumsum(0)])
        store.save("representation", i, Trajectory(rows, list(range(epochs + 1)), rows[-1]))
        if classifier:
            c_rows = torch.cat([rows[-1][None], rows[-1][None] + (steps * cls_mask).cumsum(0)])
            store.save("classifier", i, Trajectory(c_rows, list(range(epochs + 1)), c_rows[-1]))
    return store


@pytest.fixture
def tiny_store(tmp_path, tiny_data):
    return make_store(tmp_path / "experts", tiny_data)
