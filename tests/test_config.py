"""Typed configs, dotted overrides, presets (every packaged preset and profile loads)."""

from __future__ import annotations

import pytest

from ltdd.config import (DataConfig, DistillConfig, RunConfig, apply_overrides, from_dict, list_presets, load_preset,
                         parse_overrides)
from ltdd.errors import LtddError


def test_overrides_are_typed():
    cfg = apply_overrides(RunConfig(), ["data.zca=false", "distill.ipc=20", "distill.lr_img=1e3",
                                        "data.class_order=[2,1,0]", "distill.phases.0.syn_steps=7"])
    assert cfg.data.zca is False  # a real boolean, not the string "false"
    assert cfg.distill.ipc == 20 and cfg.distill.lr_img == 1000.0
    assert cfg.data.class_order == [2, 1, 0]
    assert cfg.distill.phases[0].syn_steps == 7
    with pytest.raises(LtddError, match="unknown config key 'distill.ipcc'"):
        apply_overrides(RunConfig(), ["distill.ipcc=3"])
    with pytest.raises(LtddError, match="integer"):
        apply_overrides(RunConfig(), ["distill.ipc=ten"])
    with pytest.raises(LtddError, match="true/false"):
        from_dict(DataConfig, {"zca": "yes please"})
    with pytest.raises(LtddError):
        parse_overrides(["novalue"])


def test_imbalance_alias():
    assert DataConfig(imbalance_ratio=0.01).resolved_imbalance_factor() == pytest.approx(100)
    with pytest.raises(LtddError):
        DataConfig(imbalance_factor=0.5).resolved_imbalance_factor()


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_and_profile_loads(name):
    cfg = load_preset(name)
    assert cfg.description
    for profile in cfg.profiles:
        prof = load_preset(name, profile)
        assert isinstance(prof.distill, DistillConfig)


def test_released_lad_configs_with_upstream_bugs_fixed():
    names = list_presets()
    for IF in (10, 50, 100, 200):
        for ipc in (10, 20, 50):
            assert f"lad-cifar10-if{IF}-ipc{ipc}" in names
    c = load_preset("lad-cifar10-if200-ipc50")
    assert c.distill.ipc == 50  # the upstream file said ipc 20
    c = load_preset("lad-cifar10-if50-ipc50")
    assert c.data.imbalance_factor == 50  # the upstream file pointed at IF 100
    c = load_preset("lad-cifar10-if100-ipc50")
    assert [p.syn_steps for p in c.distill.phases] == [80, 60]
    assert (c.distill.phases[0].match, c.distill.phases[0].inner_loss) == ("backbone", "dam")
    assert c.distill.phases[1].student_update == "classifier"
    with pytest.raises(LtddError, match="unknown preset"):
        load_preset("no-such-preset")
    with pytest.raises(LtddError, match="no profile"):
        load_preset("lad", "gpu-cluster")
