"""The contract between a distilled set (or an expert store) and the data it is used with."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ltdd import config as C
from ltdd.data import PreparedData, prepare_data
from ltdd.data.fingerprint import digest, fingerprint, split_sha
from ltdd.errors import LtddError
from ltdd.synset import SyntheticSet


def test_digest_is_sha256_of_canonical_json_and_of_bytes():
    assert digest({"b": 1, "a": [1, 2]}) == digest({"a": [1, 2], "b": 1})
    expected = hashlib.sha256(b'{"a":[1,2],"b":1}').hexdigest()[:16]  # written from the definition
    assert digest({"b": 1, "a": [1, 2]}) == expected
    arr = np.arange(5, dtype=np.int64)
    assert digest(arr) == hashlib.sha256(arr.tobytes()).hexdigest()[:16]
    assert digest(arr) != digest(arr[::-1].copy())


@pytest.fixture(scope="module")
def digits():
    cfg = C.DataConfig(dataset="digits", imbalance_factor=10, zca=True, normalize=True, image_size=8)
    return cfg, prepare_data(cfg)


def _set_for(data, cfg) -> SyntheticSet:
    x = data.train_x[:data.num_classes]
    return SyntheticSet(x, torch.arange(data.num_classes), meta={"data": C.to_dict(cfg), "fingerprint": fingerprint(data)})


def test_a_set_fits_the_data_it_was_made_from(digits):
    cfg, data = digits
    _set_for(data, cfg).check_compatible(data)
    assert data.fingerprint() == fingerprint(data)
    assert fingerprint(data)["split_sha"] == split_sha(data)


@pytest.mark.parametrize("change,label", [
    ({"zca": False}, "preprocessing"),
    ({"imbalance_factor": 20}, "number of train images"),
    ({"seed": 3}, "long-tailed split"),
])
def test_other_data_is_refused_naming_what_differs(digits, change, label):
    cfg, data = digits
    syn = _set_for(data, cfg)
    other = prepare_data(C.from_dict(C.DataConfig, {**C.to_dict(cfg), **change}))
    with pytest.raises(LtddError, match=label):
        syn.check_compatible(other)


def test_a_set_written_before_the_fingerprint_is_checked_as_far_as_it_goes(digits):
    cfg, data = digits
    legacy = SyntheticSet(data.train_x[:2], torch.tensor([0, 1]),
                          meta={"dataset": data.name, "split_sha": split_sha(data),
                                "preprocessor": data.preprocessor.config()})
    legacy.check_compatible(data)
    plain = prepare_data(C.from_dict(C.DataConfig, {**C.to_dict(cfg), "zca": False}))
    with pytest.raises(LtddError, match="preprocessing"):
        legacy.check_compatible(plain)


def test_soft_labels_must_cover_the_classes(digits):
    cfg, data = digits
    syn = SyntheticSet(data.train_x[:2], torch.tensor([0, 1]), torch.zeros(2, 3), meta={})
    with pytest.raises(LtddError, match="soft labels over 3 classes"):
        syn.check_compatible(data)


def test_eval_refuses_a_zca_set_on_unwhitened_data(digits, tmp_path):
    """`ltdd eval` used to merge the user's data options over the set's and evaluate a ZCA-space set on plain data."""
    from ltdd.cli import cli

    cfg, data = digits
    path = _set_for(data, cfg).save(tmp_path / "s")
    res = CliRunner().invoke(cli, ["eval", str(path), "--no-zca", "--protocol", "dc", "--runs", "1"])
    assert res.exit_code == 2 and "preprocessing" in res.output, res.output
    assert not (tmp_path / "s" / "eval.json").exists()


def test_from_tensors_is_real_prepared_data():
    x, y = torch.randn(7, 1, 4, 4), torch.tensor([0, 0, 0, 0, 1, 1, 2])
    data = PreparedData.from_tensors(x, y, x[:3], torch.tensor([0, 1, 2]), name="t")
    assert data.train_counts == [4, 2, 1] and data.test_counts == [1, 1, 1]
    assert data.split.imbalance_factor == 4.0 and data.split.class_order == [0, 1, 2]
    assert torch.equal(data.preprocessor.to_pixels(x, clamp=False), x)  # identity preprocessing
    json.dumps(data.describe())
    assert fingerprint(data)["num_train"] == 7


def test_an_expert_store_refuses_other_preprocessing(tmp_path, digits):
    from ltdd.config import ExpertConfig, ModelConfig, TrainConfig
    from ltdd.experts import TrajectoryStore
    from ltdd.models import create_model
    from ltdd.models.functional import ParamLayout

    cfg, data = digits
    model_cfg = ModelConfig("convnet", {"width": 4, "depth": 1})
    layout = ParamLayout(create_model("convnet", data.num_classes, data.channels, data.im_size, width=4, depth=1))
    store = TrajectoryStore(tmp_path / "e")
    store.initialise(ExpertConfig(model=model_cfg, train=TrainConfig(epochs=1)), data, layout)
    store.check(model_cfg, data, layout)
    plain = prepare_data(C.from_dict(C.DataConfig, {**C.to_dict(cfg), "zca": False}))
    with pytest.raises(LtddError, match="expert store .* preprocessing"):
        store.check(model_cfg, plain, layout)
