"""Reading a table's grid file (YAML): the mapping, the name its errors cite, unknown keys and bad override lists
refused in one line, and whether a trajectory row's phases fit the expert store it reads."""

from __future__ import annotations

from pathlib import Path

from ..config import load_yaml
from ..errors import LtddError

__all__ = ["read_grid", "check_keys", "strings", "phases_misfit"]


def read_grid(path: str | Path, known: set[str]) -> tuple[dict, str]:
    """``(mapping, file name)`` of the grid file at ``path``; a key outside ``known`` is an error."""
    path = Path(path)
    raw = load_yaml(path)
    where = path.name
    if not isinstance(raw, dict):
        raise LtddError(f"{where}: expected a mapping of {', '.join(sorted(known))}")
    check_keys(raw, known, where)
    return raw, where


def check_keys(spec: dict, known: set[str], where: str) -> None:
    """Refuse keys of ``spec`` outside ``known`` (a misspelt key would otherwise be ignored)."""
    unknown = sorted(map(str, set(spec) - set(known)))
    if unknown:
        raise LtddError(f"{where}: unknown key{'s' * (len(unknown) > 1)} {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(known))})")


def strings(value, where: str) -> tuple[str, ...]:
    """A list of ``key=value`` overrides as a tuple (None: none)."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise LtddError(f"{where}: expected a list of key=value overrides")
    return tuple(value)


def phases_misfit(distill, experts) -> str | None:
    """Why a trajectory-matching configuration (``distill``: its phases) cannot read a store trained with ``experts``
    (a phase reads classifier experts the store lacks, or epochs beyond those it trains), or None when it fits.
    A phase starting below ``max_start_epoch`` and matching ``expert_epochs`` ahead reads up to epoch
    ``max_start_epoch - 1 + expert_epochs``."""
    for ph in distill.phases if distill.method == "tm" else ():
        if ph.store == "classifier" and not experts.classifier_experts:
            return f"phase '{ph.name}' reads classifier experts, but the store has none (experts.classifier_experts)"
        epochs = experts.train.epochs if ph.store == "representation" else experts.classifier_train.epochs
        reach = ph.max_start_epoch - 1 + ph.expert_epochs
        if reach > epochs:
            return f"phase '{ph.name}' reads up to epoch {reach}, but the store trains {epochs} {ph.store} epochs"
    return None
