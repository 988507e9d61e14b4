"""Files written atomically (temp file + rename, so a kill leaves the old file or the new one) and the YAML / JSON /
JSON-lines readers and writers every artifact uses."""

from __future__ import annotations

import json
import os
import tempfile
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import LtddError
from .typed import to_dict


def atomic_write_file(path: str | Path, write: typing.Callable[[Path], None]) -> None:
    """Atomically create ``path`` with ``write(tmp)``, which writes the whole file at the temporary path ``tmp``.

    ``tmp`` is a fresh file in ``path``'s folder (created if missing); it is fsynced and renamed onto ``path``, or
    removed if anything fails. The one atomic writer of the package: :func:`atomic_write_bytes` uses it, and writers
    that need a file name (safetensors' ``save_file`` for large tensors) call it directly.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write_file(path, write)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_yaml(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


def save_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(to_dict(obj), indent=2) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a JSON-lines file, in order; a line cut short by a killed writer (or any line that is
    not a JSON object) is skipped. A missing file gives an empty list."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def load_yaml(path: str | Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise LtddError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise LtddError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return data or {}
