"""The running application's context: settings, workspace, store, engine, background bootstrap.

One ``Studio`` per process (the web app, ``sft-studio serve``). Everything slow (model conversion,
building the example domain, starting the inference engine) happens in background threads whose
state is readable at any time, so the UI can show progress instead of blocking.
"""
from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from sft_core import StudioError
from sft_core.config import StudioSettings
from sft_core.db import datasets as dataset_rows, evals as eval_rows, jobs as job_rows, runs as run_rows
from sft_core.store import Store, loads, open_store
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
    _download_key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

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
        """The inference engine, started on first use (vLLM where it imports, else transformers).

        A managed vLLM engine is announced to job workers (``engine.json``: URL and its per-start key),
        so an eval worker attaches to it instead of loading a second copy of the model."""
        with self._engine_lock:
            if self._engine is None:
                from sft_core.serving import get_engine
                self._engine = get_engine(base_model=self.settings.base_model, ws=self.ws, store=self.store,
                                          engine=self.settings.engine, url=self.settings.engine_url or None)
                self._engine.on_launch = lambda e: write_engine_link(self.ws, e, self.settings.base_model)
                write_engine_link(self.ws, self._engine, self.settings.base_model)
            return self._engine

    def engine_ready(self) -> bool:
        return self._engine is not None

    def close(self) -> None:
        if self._engine is not None:
            try:
                clear_engine_link(self.ws)
                self._engine.close()
            finally:
                self._engine = None

    # -- downloads -----------------------------------------------------------------------------
    @property
    def downloads_dir(self):
        """The one workspace folder the web server may serve files from (``allowed_paths``).

        Only copies of files the app hands out land here, each under an unguessable folder, so
        serving this folder exposes nothing else of the workspace (database, runs, eval outputs)."""
        return self.ws.root / "downloads"

    def stage_download(self, path) -> str:
        """Copy ``path`` (a file inside the workspace) into ``downloads_dir`` and return the copy.

        The folder name is a keyed hash of the file's path and version, so repeated polls reuse one
        copy and nobody can derive the URL of a file they were not handed."""
        import hashlib
        import hmac
        import shutil
        src = Path(path).resolve()
        if not self.ws.contains(src) or not src.is_file():
            raise StudioError(f"{src} is not a file in the workspace", "file")
        st = src.stat()
        key = hmac.new(self._download_key, f"{src}|{st.st_mtime_ns}|{st.st_size}".encode(), hashlib.sha256)
        dst = self.downloads_dir / key.hexdigest()[:32] / src.name
        if not dst.exists():
            import tempfile
            dst.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")  # concurrent polls: own temp each
            os.close(fd)
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        return str(dst)

    def clear_downloads(self) -> None:
        """Drop copies handed out by an earlier process (their folder names were keyed to it)."""
        import shutil
        shutil.rmtree(self.downloads_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Deleting things (the web app's Data and Train tabs; the library had no delete operations)
# ------------------------------------------------------------------------------------------------
ACTIVE_JOB_STATES = ("queued", "running")
FINISHED_RUN_STATES = ("succeeded", "failed", "cancelled")


def delete_dataset(name: str, ws: Workspace, store: Store) -> int:
    """Delete every version of dataset ``name`` (rows and files). Returns how many versions went.

    Refused while a queued or running training job, or a queued or running eval, uses the dataset.
    Finished runs and evals keep what they made (adapters, outputs, scores); a failed or cancelled
    run of the dataset can no longer be resumed."""
    import shutil
    from sft_core.workspace import safe_name
    safe_name(name, "dataset")
    with store.tx() as con:  # BEGIN IMMEDIATE: no job can be queued between the check and the delete
        n = dataset_rows.count_versions(con, name)
        if not n:
            raise StudioError(f"unknown dataset {name!r}", "dataset")
        busy = run_rows.training_on_dataset(con, name) + eval_rows.active_for_dataset(con, name)
        if busy:
            raise StudioError(f"dataset {name!r} is in use by {', '.join(busy)} (queued or running); "
                              "cancel or wait for it first", "dataset")
        paths = dataset_rows.delete_dataset(con, name)
    for p in paths + [str(ws.datasets_dir(name))]:
        if ws.contains(p) and Path(p).resolve() != ws.root:
            shutil.rmtree(p, ignore_errors=True)
    return n


def delete_run(run_id: str, ws: Workspace, store: Store) -> None:
    """Delete a finished, failed or cancelled run: its row, its jobs and its directory (adapter too).

    Refused while the run is queued or running (cancel it first), or while a queued or running eval
    uses its adapter. Finished evals and rating campaigns keep the answers it gave."""
    import shutil
    from sft_core.workspace import safe_name
    safe_name(run_id, "run")
    with store.tx() as con:
        run = run_rows.get(con, run_id)
        if run is None:
            raise StudioError(f"unknown run {run_id!r}", "run")
        active = next(iter(job_rows.live(con, ref=run_id)), None)
        if run["status"] not in FINISHED_RUN_STATES or active:
            state = active["status"] if active else run["status"]
            raise StudioError(f"run {run_id} is {state}; only succeeded, failed or cancelled runs can be deleted "
                              "(cancel it first)", "run")
        evals = [r["id"] for r in eval_rows.list_evals(con, status=("queued", "running"))
                 if any(str(s).split(":", 1)[-1] == run_id for s in loads(r["systems"], []))]
        if evals:
            raise StudioError(f"run {run_id} is in use by {', '.join(evals)} (queued or running); "
                              "wait for it first", "run")
        job_rows.delete_for(con, run_id, kind="train")
        run_rows.delete_run(con, run_id)
    for p in (run["path"], str(ws.runs_dir(run_id))):
        if ws.contains(p) and Path(p).resolve() != ws.root:
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# The app's engine, announced to job workers
# ------------------------------------------------------------------------------------------------
def engine_link_path(ws: Workspace) -> Path:
    return ws.root / "run" / "engine.json"


def write_engine_link(ws: Workspace, engine, base_name: str) -> None:
    """``run/engine.json`` (mode 0600, like the workspace's other secrets): the managed engine's URL, its
    per-start API key and the app's pid. Only a managed vLLM engine is announced (the transformers engine
    lives inside the app's process and has no URL)."""
    if not getattr(engine, "managed", False) or not getattr(engine, "url", ""):
        return
    import json
    path = engine_link_path(ws)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": engine.url, "api_key": getattr(engine, "_api_key", None), "pid": os.getpid(),
                   "base_model": str(getattr(engine, "base_model", "")), "base_name": base_name,
                   "time": time.time()}, f)
    os.replace(tmp, path)


def clear_engine_link(ws: Workspace) -> None:
    try:
        engine_link_path(ws).unlink()
    except FileNotFoundError:
        pass


def read_engine_link(ws: Workspace) -> dict | None:
    """The app's engine if one is announced and the app that announced it is alive, else None."""
    import json
    try:
        link = json.loads(engine_link_path(ws).read_text())
        os.kill(int(link["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return link
