"""ltdd.locks (exclusive claims through lock files) and the reproduction tables' use of them (ltdd.experiments)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from ltdd.experiments.cells import Cell, CellTable
from ltdd.locks import lock_is_stale, try_lock, unlock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_claim_fails_until_unlocked(tmp_path):
    lock = tmp_path / "a" / "x.lock"
    assert try_lock(lock)
    assert lock.read_text() == f"{socket.gethostname()}:{os.getpid()}"
    assert not try_lock(lock)  # held by a live process (this one)
    assert not lock_is_stale(lock)
    unlock(lock)
    assert not lock.exists() and lock_is_stale(lock)
    assert try_lock(lock)


def test_lock_of_dead_process_is_stale_and_taken_over(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text(f"{socket.gethostname()}:{_dead_pid()}")
    assert lock_is_stale(lock)
    assert try_lock(lock)
    assert lock.read_text().endswith(f":{os.getpid()}")


def test_other_hosts_lock_is_kept_unless_very_old(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text("some-other-host:1")
    assert not lock_is_stale(lock) and not try_lock(lock)
    os.utime(lock, (0, 0))  # 1970: far older than a day
    assert lock_is_stale(lock) and try_lock(lock)


def test_table_cell_skips_a_cell_another_live_process_holds(tmp_path):
    table = CellTable("t-cpu", tmp_path / "w", tmp_path / "res", "cpu")
    cell = Cell("c1", {"what": "c1"})
    calls = []

    def fn():
        calls.append(1)
        return {"summary": {"accuracy": {"mean": 0.5, "std": 0.0}}}

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        table.lock_path("c1").parent.mkdir(parents=True)
        table.lock_path("c1").write_text(f"{socket.gethostname()}:{holder.pid}")
        assert table.cell(cell, fn) is None and calls == []  # a live owner: skipped, nothing computed
    finally:
        holder.kill()
        holder.wait()
    res = table.cell(cell, fn)  # the owner died: taken over and computed
    assert calls == [1] and res["summary"]["accuracy"]["mean"] == 0.5
    assert not table.lock_path("c1").exists()
    assert json.loads(table.path("c1").read_text())["result"]["summary"]["accuracy"]["mean"] == 0.5
    assert table.cell(cell, fn)["seconds"] >= 0 and calls == [1]  # finished cells are reused
