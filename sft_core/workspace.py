"""Where things live on disk: one root, safe names, content hashes, atomic writes.

Layout under the root (``SFT_STUDIO_HOME``, default ``./workspace``)::

    studio.db                 SQLite store (jobs, runs, datasets, evals, ratings)
    models/<name>/            converted / cached base models
    datasets/<name>/<hash>/   normalised splits + report + manifest
    kb/<name>/                knowledge-base index
    runs/<run_id>/            training runs
    evals/<eval_id>/          evaluation runs
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from sft_core import StudioError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")


class NameError_(StudioError):
    """An unsafe or invalid name."""


def safe_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is safe as a single path component, else raise StudioError.

    Rejects path separators, ``..``, control characters, leading dots/dashes and empty names.
    """
    if not isinstance(name, str) or not name:
        raise NameError_("must not be empty", what)
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise NameError_(f"{name!r} contains control characters", what)
    if "/" in name or "\\" in name or ".." in name or os.sep in name:
        raise NameError_(f"{name!r} must not contain path separators or '..'", what)
    if not _NAME_RE.match(name):
        raise NameError_(f"{name!r} may use letters, digits, '.', '_', '+', '-' (up to 100, starting with a letter or digit)", what)
    return name


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_dir(path: str | os.PathLike, pattern: str = "*") -> str:
    """Hash of a directory's files (relative names + contents), order independent of the filesystem."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob(pattern) if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temp file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Atomically write a whole JSONL file."""
    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
    return atomic_write_text(path, text)


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one line and flush it (for live logs read while they grow)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        f.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file written by this project; a torn last line (crash mid-append) is ignored."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, exist_ok: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place only if the block succeeds.

    If ``final`` exists already: raise (default), or with ``exist_ok`` keep the existing one and
    discard the new content (for content-addressed directories whose content is identical).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not exist_ok:
        raise StudioError(f"{final} already exists and is never overwritten")
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def from_env(cls) -> "Workspace":
        return cls.at(os.environ.get("SFT_STUDIO_HOME", "./workspace"))

    @classmethod
    def at(cls, root: str | os.PathLike) -> "Workspace":
        ws = cls(Path(root).expanduser().resolve())
        ws.root.mkdir(parents=True, exist_ok=True)
        return ws

    @property
    def db_path(self) -> Path:
        return self.root / "studio.db"

    @property
    def db_url(self) -> str:
        return os.environ.get("SFT_STUDIO_DB_URL") or f"sqlite:///{self.db_path}"

    def _sub(self, kind: str, *names: str) -> Path:
        p = self.root / kind
        for n in names:
            p = p / safe_name(n)
        return p

    def models_dir(self, *names: str) -> Path:
        return self._sub("models", *names)

    def datasets_dir(self, *names: str) -> Path:
        return self._sub("datasets", *names)

    def kb_dir(self, *names: str) -> Path:
        return self._sub("kb", *names)

    def runs_dir(self, *names: str) -> Path:
        return self._sub("runs", *names)

    def evals_dir(self, *names: str) -> Path:
        return self._sub("evals", *names)

    def contains(self, path: str | os.PathLike) -> bool:
        """True if ``path`` resolves to a location inside the workspace (links resolved)."""
        try:
            Path(path).resolve().relative_to(self.root)
            return True
        except ValueError:
            return False
