"""Reproducing the papers' tables: resumable grids of keyed cells, their reports and the papers' numbers.

* :mod:`.cells`: a table's cells (key material and hash, records, claims with lock files, plan state).
* :mod:`.kinds`: what a cell computes (distil and evaluate, expert store, full data, two-stage rows).
* :mod:`.lad_table` / :mod:`.lad_report`: the LAD paper's Table 1 on CIFAR-10-LT and its report.
* :mod:`.two_stage_table` / :mod:`.two_stage_report`: the two-stage paper's Tables 1-3 and their report.
* :mod:`.netstore`: the two-stage table's trained networks with their test logits.
* :mod:`.compute_table` / :mod:`.compute_report`: the accuracy-vs-compute table (points as YAML data in ``grids/``),
  its report; :mod:`.compute_cost` (plan-time estimates), :mod:`.compute_reading` (best per budget decade, where
  two curves cross), :mod:`.compute_command` (its ``--plan`` / run).
* :mod:`.adopt`: one-time import of legacy (name-keyed) cells.
* :mod:`.paper`: the papers' numbers (YAML data files in ``paper/``).
* :mod:`.command`: the ``ltdd reproduce`` command (``reproduce_cmd``).
"""

from .cells import Cell, CellTable, config_material, data_key, key_hash

__all__ = ["Cell", "CellTable", "key_hash", "data_key", "config_material"]
