"""Evaluation protocols are data (YAML in the package) and resolve to the published settings."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from ltdd import config as C
from ltdd.errors import LtddError

# Known answers written from the papers' protocols: (epochs, batch, lr, momentum, weight decay, schedule, DSA,
# learned lr, runs, ConvNet width)
KNOWN = {
    "lad": (1000, 128, 0.01, 0.9, 5e-4, "step_half", True, True, 5, 128),  # LAD's evaluation: batch_train 128
    "dc": (300, 256, 0.01, 0.9, 5e-4, "constant", False, False, 5, 128),
    "cpu": (300, 256, 0.01, 0.9, 5e-4, "step_half", True, True, 3, 32),  # = 128 at IPC 10: one batch per epoch
    "relabel": (1000, 25, 1e-3, 0.9, 0.01, "constant", True, False, 5, 128),
    "relabel_cpu": (300, 25, 1e-3, 0.9, 0.01, "constant", True, False, 3, 32),
}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_protocol_resolves_to_its_known_settings(name):
    p = C.protocol_preset(name)
    t = p.train
    got = (t.epochs, t.batch_size, t.lr, t.momentum, t.weight_decay, t.schedule, t.dsa, p.use_learned_lr, p.runs,
           p.model.args.get("width", 128))
    assert got == KNOWN[name]
    assert p.model.name == "convnet"
    assert isinstance(p, C.RelabelProtocolConfig) == name.startswith("relabel")


def test_every_packaged_protocol_is_known_here():
    assert set(C.list_protocols()) == set(KNOWN)


def test_unknown_protocol_and_bad_file(tmp_path, monkeypatch):
    with pytest.raises(LtddError, match="unknown evaluation protocol 'nosuch'"):
        C.protocol_preset("nosuch")
    (tmp_path / "odd.yaml").write_text("kind: magic\nruns: 1\n")
    (tmp_path / "typo.yaml").write_text("runz: 1\n")
    monkeypatch.setattr(C, "PROTOCOL_DIR", tmp_path)
    with pytest.raises(LtddError, match="unknown kind 'magic'"):
        C.protocol_preset("odd")
    with pytest.raises(LtddError, match="runz"):
        C.protocol_preset("typo")


def test_protocols_command():
    from ltdd.cli import cli

    res = CliRunner().invoke(cli, ["protocols"])
    assert res.exit_code == 0 and all(n in res.output for n in KNOWN)
    res = CliRunner().invoke(cli, ["protocols", "cpu"])
    assert res.exit_code == 0 and "epochs: 300" in res.output
    res = CliRunner().invoke(cli, ["protocols", "nosuch"])
    assert res.exit_code == 2 and "# protocol" not in res.output
