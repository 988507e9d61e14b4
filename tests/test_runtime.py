"""The process-wide runtime settings: every ``ltdd`` command applies the CPU malloc tuning once, the engine does not."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner


def test_every_command_applies_the_process_settings(monkeypatch):
    import ltdd.runtime as runtime
    from ltdd.cli import cli

    calls = []
    monkeypatch.setattr(runtime, "configure_process", lambda: calls.append(1) or {"malloc_tuning": True})
    for args in (["models"], ["presets"]):
        calls.clear()
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
        assert calls == [1]


def test_the_switch_turns_it_off(monkeypatch):
    import ltdd.runtime as runtime

    applied = []
    monkeypatch.setattr(runtime, "tune_cpu_malloc", lambda: applied.append(1) or True)
    monkeypatch.setenv("LTDD_MALLOC_TUNING", "0")
    assert runtime.configure_process() == {"malloc_tuning": False} and applied == []
    monkeypatch.setenv("LTDD_MALLOC_TUNING", "1")
    assert runtime.configure_process() == {"malloc_tuning": True} and applied == [1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuning_applies_on_glibc():
    from ltdd.runtime import tune_cpu_malloc

    assert tune_cpu_malloc() is True
    assert tune_cpu_malloc() is True  # idempotent


def test_the_engine_does_not_touch_process_settings(monkeypatch, tiny_store, tiny_data):
    import ltdd.runtime as runtime
    from ltdd.config import DistillConfig, PhaseConfig
    from ltdd.distill.engine import TrajectoryMatching

    monkeypatch.setattr(runtime, "_MALLOC_TUNED", False)
    monkeypatch.setattr(runtime, "tune_cpu_malloc", lambda: pytest.fail("the engine tuned malloc"))
    ph = PhaseConfig(max_start_epoch=2, syn_steps=1)
    TrajectoryMatching(DistillConfig(ipc=1, phases=[ph], image_init="real", label_init="onehot"), tiny_data,
                       experts_dir=tiny_store.root)
