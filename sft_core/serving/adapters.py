"""Adapter registry: the only way a name becomes an adapter path.

An adapter is addressed by the id of the training run that produced it. It is servable when the
``runs`` row has ``status='succeeded'`` and ``runs/<run_id>/adapter/`` (PEFT format) exists inside
the workspace. Anything else in a request — an unknown name, a path, ``..``, a URL — is refused
here with an :class:`EngineError` and never reaches an engine (vLLM's ``lora/request.py`` warns
not to let users hand it arbitrary paths).

Each name gets a unique, stable positive integer id for the life of the registry (vLLM's
``lora_int_id``; the HF engine uses the name itself as peft adapter name).
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

from sft_core.serving.base import EngineError
from sft_core.db import runs as run_rows
from sft_core.store import Store
from sft_core.workspace import NameError_, Workspace, safe_name


@dataclass(frozen=True)
class AdapterInfo:
    name: str          # the run id
    path: Path         # runs/<name>/adapter, resolved, inside the workspace
    lora_id: int       # unique per name (vLLM lora_int_id)
    rank: int          # LoRA r from adapter_config.json
    base_model: str    # the run's base model (as recorded in `runs`)


class AdapterRegistry:
    def __init__(self, ws: Workspace, store: Store):
        self.ws = ws
        self.store = store
        self._ids: dict[str, int] = {}
        self._lock = threading.Lock()

    def _lora_id(self, name: str) -> int:
        with self._lock:
            if name not in self._ids:
                self._ids[name] = len(self._ids) + 1
            return self._ids[name]

    def check_name(self, name: str) -> str:
        """Refuse anything that is not a plain run id (paths, URLs, control characters)."""
        if not isinstance(name, str) or not name:
            raise EngineError("adapter name must be a non-empty run id", "adapter")
        if any(c in name for c in "/\\:~") or name.startswith(".") or ".." in name:
            raise EngineError(f"{name!r} looks like a path; adapters are addressed by run id only", "adapter")
        try:
            return safe_name(name, "adapter")
        except NameError_ as e:
            raise EngineError(e.message, "adapter") from None

    def resolve(self, name: str) -> AdapterInfo:
        """The adapter for a run id, or EngineError naming what is wrong."""
        name = self.check_name(name)
        row = run_rows.get(self.store, name)
        if row is None:
            known = ", ".join(self.available()[:10]) or "none yet"
            raise EngineError(f"unknown adapter {name!r} (no such training run; ready adapters: {known})", "adapter")
        if row["status"] != "succeeded":
            raise EngineError(f"run {name!r} is {row['status']}; only succeeded runs can be served", "adapter")
        path = self.ws.runs_dir(name, "adapter")
        cfg_path = path / "adapter_config.json"
        if not cfg_path.is_file():
            raise EngineError(f"run {name!r} succeeded but {cfg_path} is missing", "adapter")
        if not self.ws.contains(path):  # e.g. a symlink pointing out of the workspace
            raise EngineError(f"{path} resolves outside the workspace; refused", "adapter")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise EngineError(f"cannot read adapter config: {e}", str(cfg_path)) from None
        return AdapterInfo(name=name, path=path.resolve(), lora_id=self._lora_id(name),
                           rank=int(cfg.get("r", 8)), base_model=row["base_model"])

    def available(self) -> list[str]:
        """Run ids whose adapters are ready to serve (succeeded, adapter dir present), oldest first."""
        rows = run_rows.list_runs(self.store, status="succeeded", newest_first=False)
        out = []
        for r in rows:
            try:
                if (self.ws.runs_dir(r["id"], "adapter") / "adapter_config.json").is_file():
                    out.append(r["id"])
            except NameError_:
                continue
        return out
