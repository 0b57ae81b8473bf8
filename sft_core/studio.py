"""The running application's context: settings, workspace, store, engine, background bootstrap.

One ``Studio`` per process (the web app, ``sft-studio serve``). Everything slow (model conversion,
building the example domain, starting the inference engine) happens in background threads whose
state is readable at any time, so the UI can show progress instead of blocking.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass, field

from sft_core import StudioError
from sft_core.config import StudioSettings
from sft_core.store import Store, open_store
from sft_core.workspace import Workspace

log = logging.getLogger(__name__)

EXAMPLE_NAME = "pydocs"


@dataclass
class Task:
    """A background task's visible state."""
    name: str
    status: str = "pending"  # pending | running | done | failed
    message: str = ""
    started: float = 0.0
    ended: float = 0.0
    error: str = ""

    def line(self) -> str:
        took = f" ({(self.ended or time.time()) - self.started:.0f}s)" if self.started else ""
        text = self.error if self.status == "failed" else self.message
        return f"[{self.status}] {self.name}{took}: {text}"


@dataclass
class Studio:
    settings: StudioSettings
    ws: Workspace
    store: Store
    tasks: dict[str, Task] = field(default_factory=dict)
    _engine: object | None = None
    _engine_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_env(cls) -> "Studio":
        import os
        settings = StudioSettings.from_env()
        if "SFT_STUDIO_HOME" not in os.environ:
            os.environ["SFT_STUDIO_HOME"] = settings.home
        ws = Workspace.at(settings.home)
        store = open_store(settings.db_url or ws.db_url)
        return cls(settings=settings, ws=ws, store=store)

    # -- background tasks ----------------------------------------------------------------------
    def run_task(self, name: str, fn, *args, **kwargs) -> Task:
        """Run ``fn(task, *args)`` in a daemon thread; its progress is visible through ``status_lines``."""
        task = self.tasks.get(name)
        if task and task.status == "running":
            return task
        task = self.tasks[name] = Task(name, "running", "starting", time.time())

        def body():
            try:
                fn(task, *args, **kwargs)
                task.status, task.ended = "done", time.time()
                if not task.message or task.message == "starting":
                    task.message = "ready"
            except StudioError as e:
                task.status, task.error, task.ended = "failed", str(e), time.time()
            except Exception as e:  # shown in the UI, logged with its traceback
                log.error("background task %s failed:\n%s", name, traceback.format_exc())
                task.status, task.error, task.ended = "failed", f"{type(e).__name__}: {e}", time.time()

        threading.Thread(target=body, name=f"studio-{name}", daemon=True).start()
        return task

    def status_lines(self) -> str:
        return "\n".join(t.line() for t in self.tasks.values()) or "idle"

    def wait(self, name: str, timeout: float = 600) -> Task:
        end = time.time() + timeout
        while time.time() < end:
            t = self.tasks.get(name)
            if t and t.status in ("done", "failed"):
                return t
            time.sleep(0.2)
        raise StudioError(f"background task {name} did not finish in {timeout:.0f}s")

    # -- engine --------------------------------------------------------------------------------
    def engine(self):
        """The inference engine, started on first use (vLLM where it imports, else transformers)."""
        with self._engine_lock:
            if self._engine is None:
                from sft_core.serving import get_engine
                self._engine = get_engine(base_model=self.settings.base_model, ws=self.ws, store=self.store,
                                          engine=self.settings.engine, url=self.settings.engine_url or None)
            return self._engine

    def engine_ready(self) -> bool:
        return self._engine is not None

    def close(self) -> None:
        if self._engine is not None:
            try:
                self._engine.close()
            finally:
                self._engine = None
