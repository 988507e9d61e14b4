"""Read-only view of a folder or a .tar/.tar.gz/.tgz/.zip archive: its regular files as posix names and bytes."""

from __future__ import annotations

import hashlib
import os
import stat as stat_mod
import tarfile
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

from ...errors import LtddError
from .base import _one_line
from .decoded_cache import _file_stat

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


def _is_archive(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(ARCHIVE_SUFFIXES)


def _clean_member(name: str) -> str:
    """Archive member name without leading './' or '/' components."""
    while True:
        if name.startswith("./"):
            name = name[2:]
        elif name.startswith("/"):
            name = name[1:]
        else:
            return name


def _hidden(rel: str) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in rel.split("/"))


class _Tree:
    """Read-only view of a folder or archive; names are posix paths relative to the root, regular files only."""

    def __init__(self, root: Path):
        self.root = root
        self._tar: tarfile.TarFile | None = None
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, object] = {}
        self.stats: dict[str, tuple[int, int]] = {}
        self.dir_names: set[str] = set()  # folders seen (posix, trailing '/'), to report empty class folders
        if root.is_dir():
            self.kind = "dir"
            self._walk()
        elif _is_archive(root):
            try:
                if root.name.lower().endswith(".zip"):
                    self.kind = "zip"
                    self._zip = zipfile.ZipFile(root)
                    for info in self._zip.infolist():
                        if not info.is_dir():
                            self._members[_clean_member(info.filename)] = info
                        else:
                            self.dir_names.add(_clean_member(info.filename).rstrip("/") + "/")
                else:
                    self.kind = "tar"
                    self._tar = tarfile.open(root, "r:*")
                    for m in self._tar.getmembers():
                        if m.isfile():
                            self._members[_clean_member(m.name)] = m
                        elif m.isdir():
                            self.dir_names.add(_clean_member(m.name).rstrip("/") + "/")
            except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
                self.close()
                raise LtddError(f"cannot read archive {root}: {_one_line(e)}") from None
        else:
            raise LtddError(f"{root} is neither a folder nor a .tar/.tar.gz/.tgz/.zip archive")

    def _walk(self) -> None:
        base = str(self.root)
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = os.path.relpath(dirpath, base)
            rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
            if rel_dir:
                self.dir_names.add(rel_dir)
            for fn in filenames:
                if fn.startswith("."):
                    continue
                full = os.path.join(dirpath, fn)
                try:
                    st = os.stat(full)
                except OSError:
                    continue
                if stat_mod.S_ISREG(st.st_mode):
                    self.stats[rel_dir + fn] = (st.st_size, st.st_mtime_ns)

    def names(self) -> list[str]:
        return list(self.stats) if self.kind == "dir" else list(self._members)

    def where(self, name: str) -> str:
        """How to name a member in an error message."""
        if self.kind == "dir":
            return str(self.root / name)
        return f"{self.root}:{name}"

    def fingerprint(self) -> dict:
        if self.kind == "dir":
            h = hashlib.sha256()
            for name in sorted(self.stats):
                size, mtime = self.stats[name]
                h.update(f"{name}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
            return {"path": str(self.root.resolve()), "tree": h.hexdigest()}
        return _file_stat(self.root)

    def read_many(self, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """Yield ``(name, bytes)`` for the wanted names, in storage order (one forward pass through a tar.gz)."""
        wanted = set(names)
        if self.kind == "dir":
            for name in sorted(wanted):
                try:
                    yield name, (self.root / name).read_bytes()
                except OSError as e:
                    raise LtddError(f"cannot read {self.root / name}: {_one_line(e)}") from None
            return
        order = [n for n in self._members if n in wanted]
        for name in order:
            try:
                if self._zip is not None:
                    data = self._zip.read(self._members[name])  # type: ignore[arg-type]
                else:
                    f = self._tar.extractfile(self._members[name])  # type: ignore[union-attr,arg-type]
                    data = f.read() if f is not None else b""
            except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                raise LtddError(f"cannot read {self.where(name)}: {_one_line(e)}") from None
            yield name, data

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self) -> "_Tree":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

