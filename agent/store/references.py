"""Durable reference profiles: one JSON document per reference, the last few kept as history.

A profile holds bin edges, counts and summary statistics only, never raw feature
values. Files are written atomically (temporary file, fsync, rename), so a crash
leaves either the old reference or the new one, never half of one.

    store = ReferenceStore(Path("data/references"), history=5)
    store.save("churn", "v3", profile_dict)          # profile_dict["id"] names the file
    store.latest("churn", "v3")                       # -> the dict, or None
    store.history("churn", "v3")                      # newest first
    store.forget("churn")                             # every version's references
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

_SAFE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_ID = re.compile(r"[A-Za-z0-9]{1,64}")


class ReferenceStoreError(Exception):
    """A reference file that cannot be read back; the message names the file."""


def _checked(kind: str, value: str) -> str:
    # Model names and ids become path components: refuse anything that could escape the store.
    pattern = _ID if kind == "id" else _SAFE
    if not pattern.fullmatch(value) or value in {".", ".."}:
        raise ValueError(f"{kind}: {value!r} is not a safe name ({pattern.pattern})")
    return value


def _version_dir(version: str) -> str:
    """Versions may hold any character the wire allows: percent-encode all but the safe ones."""
    if not version:
        return "_"
    # "_" is kept for the empty version, so a real "_" is encoded too.
    encoded = quote(version, safe="-.").replace("_", "%5F")
    return "%2E%2E" if encoded == ".." else ("%2E" if encoded == "." else encoded)


class ReferenceStore:
    """References per model version under ``root/<model>/<version or _>/<seq>-<id>.json``."""

    def __init__(self, root: Path, *, history: int = 5) -> None:
        if history < 1:
            raise ValueError(f"history: must be at least 1, got {history}")
        self.root = root
        self.history_size = history
        root.mkdir(parents=True, exist_ok=True)

    def _dir(self, model: str, version: str) -> Path:
        return self.root / _checked("model", model) / _version_dir(version)

    def _files(self, model: str, version: str) -> list[Path]:
        """Newest first: names start with a zero-padded sequence number."""
        directory = self._dir(model, version)
        if not directory.is_dir():
            return []
        return sorted(directory.glob("*.json"), reverse=True)

    def save(self, model: str, version: str, profile: dict[str, Any]) -> Path:
        """Persist ``profile`` as the newest reference; prune history beyond the limit."""
        reference_id = _checked("id", str(profile.get("id", "")))
        directory = self._dir(model, version)
        directory.mkdir(parents=True, exist_ok=True)
        existing = self._files(model, version)
        if existing and existing[0].name.endswith(f"-{reference_id}.json"):
            return existing[0]  # the same reference again: history keeps distinct ones
        sequence = int(existing[0].name.split("-", 1)[0]) + 1 if existing else 1
        path = directory / f"{sequence:08d}-{reference_id}.json"
        data = json.dumps(profile, sort_keys=True, allow_nan=False).encode()
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(directory)
        for old in self._files(model, version)[self.history_size :]:
            old.unlink(missing_ok=True)
        return path

    def _read(self, path: Path) -> dict[str, Any]:
        try:
            document = json.loads(path.read_bytes())
        except (OSError, ValueError) as error:
            raise ReferenceStoreError(
                f"reference file {str(path)!r} is unreadable: {error}"
            ) from None
        if not isinstance(document, dict):
            raise ReferenceStoreError(f"reference file {str(path)!r} does not hold a JSON object")
        return document

    def latest(self, model: str, version: str) -> dict[str, Any] | None:
        files = self._files(model, version)
        return self._read(files[0]) if files else None

    def history(self, model: str, version: str) -> list[dict[str, Any]]:
        return [self._read(path) for path in self._files(model, version)]

    def models(self) -> list[tuple[str, str]]:
        """Every (model, version) with at least one stored reference; version '' for '_'."""
        found = []
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for version_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
                if any(version_dir.glob("*.json")):
                    version = "" if version_dir.name == "_" else unquote(version_dir.name)
                    found.append((model_dir.name, version))
        return found

    def forget(self, model: str) -> int:
        """Remove every reference of ``model``; returns how many files were removed."""
        model_dir = self.root / _checked("model", model)
        if not model_dir.is_dir():
            return 0
        removed = 0
        for path in sorted(model_dir.rglob("*"), reverse=True):  # files before their folders
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()
                removed += path.suffix == ".json"
        model_dir.rmdir()
        return removed


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
