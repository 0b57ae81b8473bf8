"""Where a job's worker process runs: on this machine (default) or on a Ray cluster.

The runner starts a worker (``backend.start``), records ``handle.ref`` in the jobs row, polls
``handle.poll()`` until an exit code (Popen's meaning: negative = killed by that signal) and calls
``handle.terminate()`` on a cancel; ``reconcile`` asks ``backend_for_ref(ref).alive(ref)``.

* ``LocalBackend`` (``SFT_STUDIO_JOBS=local``, default): a subprocess in its own session (process
  group), output appended to the job's log; ref ``local:<pid>:<start time>``.
* ``RayBackend`` (``SFT_STUDIO_JOBS=ray``, ``RAY_ADDRESS=http://<head>:8265``): a Ray *job* (Jobs API);
  ref ``ray:<submission id>``. The Jobs API, not Ray tasks, because a Ray job is the cluster's
  subprocess: the same command line as locally, it outlives the app process that submitted it (a
  restarted app finds it by submission id as it finds a local worker by pid), and has its own status,
  exit code, log and stop. Tasks would make the app a connected driver whose exit takes the work with
  it. All of it is HTTP to the dashboard: this process never joins the cluster.

Ray 2.60 (dashboard/modules/job/job_supervisor.py): the entrypoint runs as ``/bin/sh -c`` in a new
session; ours ``exec``s the worker, so driver_exit_code means what Popen's does (-9: SIGKILL).
``stop_job`` SIGTERMs the entrypoint and each descendant, waits ``RAY_JOB_STOP_WAIT_TIME_S`` (default
3 s), SIGKILLs them and marks the job STOPPED without a code; the supervisor reads that variable from
the job's runtime_env, so we set it (``stop_wait_s``) long enough for a step and a checkpoint. Ray
keeps the output on the head node; ours goes to ``log_path``. That path, the workspace, the venv
(``argv[0]``) and the working directory must exist at the same paths on every node. GPUs:
``entrypoint_num_gpus`` reserves them and Ray sets CUDA_VISIBLE_DEVICES (the runner's is not passed on).
Only ``RAY_ENV_PREFIXES``/``RAY_ENV_NAMES`` travel, in the runtime_env, which whoever reaches the
dashboard can read (an HF_TOKEN too).
"""
from __future__ import annotations

import functools
import logging
import os
import re
import shlex
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Mapping

from sft_core import StudioError
from sft_core.train import EXIT_CANCELLED

log = logging.getLogger(__name__)

BACKENDS = ("local", "ray")
RAY_ENV_PREFIXES = ("SFT_STUDIO_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")
RAY_ENV_NAMES = ("PYTHONUNBUFFERED",)


class WorkerHandle:
    ref: str  # recorded in the jobs row

    def poll(self) -> int | None:  # None while running, else the exit code (negative: killed by signal)
        raise NotImplementedError

    def terminate(self) -> None:  # ask the worker to stop (it exits with EXIT_CANCELLED when it can)
        raise NotImplementedError


# ---- local ----------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _proc_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _same_process(pid: int, start: str | None) -> bool:
    """Whether ``pid`` is still the recorded process (alive, started at ``start``; None: liveness only)."""
    if not _alive(pid):
        return False
    if start is None:
        return True
    now = _proc_start(pid)
    return now is None or now == start  # no /proc (not Linux): liveness is all there is


class LocalHandle(WorkerHandle):
    def __init__(self, proc: subprocess.Popen):
        self.proc, self.pid = proc, proc.pid
        self.ref = f"local:{proc.pid}:{_proc_start(proc.pid) or ''}"

    def poll(self) -> int | None:
        return self.proc.poll()

    def terminate(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


class LocalBackend:
    name = "local"

    def check(self, num_gpus: int = 0) -> None:
        return None

    def start(self, argv: list[str], env: Mapping[str, str], log_path: str | Path, num_gpus: int = 0,
              job_id: str = "job") -> LocalHandle:
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=dict(env),
                                    start_new_session=True)
        return LocalHandle(proc)

    def alive(self, ref: str) -> bool:
        m = re.fullmatch(r"local:(\d+):(\d*)", ref)
        if not m:
            raise StudioError(f"not a local worker reference: {ref!r}", "ref")
        return _same_process(int(m[1]), m[2] or None)

    def waiting(self, ref: str) -> bool:
        return False  # a local worker starts at once


# ---- Ray ------------------------------------------------------------------------------------------
@functools.cache
def _client_class():
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:
        raise StudioError(f"SFT_STUDIO_JOBS=ray needs Ray's job client: pip install 'ray[default]' ({e})",
                          "SFT_STUDIO_JOBS") from None

    class Client(JobSubmissionClient):
        """The stock client sends its HTTP requests without a timeout; here each one gets one."""

        def __init__(self, address: str, timeout_s: float):
            self._timeout_s = timeout_s
            super().__init__(address)

        def _do_request(self, method, endpoint, **kwargs):
            kwargs.setdefault("timeout", self._timeout_s)
            return super()._do_request(method, endpoint, **kwargs)
    return Client


class RayHandle(WorkerHandle):
    def __init__(self, backend: RayBackend, submission_id: str, log_path: str | None = None):
        self.backend, self.submission_id, self.log_path = backend, submission_id, log_path
        self.ref = f"ray:{submission_id}"
        self.stop_requested = False
        self.reason: str | None = None  # why it ended, when no exit code of the worker's says it
        self._code: int | None = None
        self._unreachable_since: float | None = None

    def poll(self) -> int | None:
        if self._code is None:
            self._code = self._poll()
        return self._code

    def _poll(self) -> int | None:
        try:
            info = self.backend.ask("get_job_info", self.submission_id)
        except LookupError as e:  # Ray no longer knows the job (deleted, or the cluster was replaced)
            return self._ended_without_code(str(e))
        except StudioError as e:  # the dashboard is down or restarting: the worker may well be running
            if self._unreachable_since is None:
                self._unreachable_since = time.time()
                log.warning("Ray job %s: %s (still trying)", self.submission_id, e)
            since = self._unreachable_since
            if time.time() - since < self.backend.give_up_s:
                return None
            return self._ended_without_code(f"lost contact with the Ray cluster for {time.time() - since:.0f}s: {e}")
        self._unreachable_since = None
        status = str(getattr(info.status, "value", info.status))
        if status in ("PENDING", "RUNNING"):
            return None
        if status == "SUCCEEDED":
            return 0
        if status == "STOPPED":
            return EXIT_CANCELLED if self.stop_requested else -signal.SIGTERM
        code = info.driver_exit_code  # FAILED
        m = re.search(r"failed with exit code (-?\d+)", info.message or "") if code is None else None
        code = int(m[1]) if m else code
        if not code:  # the worker never ran, or Ray lost it (runtime env, node or supervisor died)
            message = (info.message or "").strip()[:2000]
            return self._ended_without_code(f"Ray job {self.submission_id} {status}: {message}")
        return code

    def _ended_without_code(self, reason: str) -> int:
        self.reason = reason
        if self.log_path:
            try:
                with open(self.log_path, "a") as f:
                    f.write(f"\n{reason}\n")
            except OSError:
                pass
        return 1

    def terminate(self) -> None:
        self.stop_requested = True
        try:
            self.backend.ask("stop_job", self.submission_id)
        except (StudioError, LookupError) as e:  # the worker also stops on the job's cancel flag
            log.warning("could not stop Ray job %s: %s", self.submission_id, e)


class RayBackend:
    name = "ray"

    def __init__(self, address: str | None, timeout_s: float = 10.0, stop_wait_s: int = 600,
                 give_up_s: float = 600.0):
        self.address = (address or "").strip().rstrip("/") or None
        self.timeout_s, self.stop_wait_s, self.give_up_s = timeout_s, stop_wait_s, give_up_s
        self._client = None

    def _unreachable(self, e: Exception) -> StudioError:
        return StudioError(f"cannot reach the Ray cluster at {self.address}: {e}", "RAY_ADDRESS")

    def client(self):
        """The job client (checks the connection on first use); StudioError naming RAY_ADDRESS."""
        if self._client is None:
            if not self.address:
                raise StudioError("SFT_STUDIO_JOBS=ray needs RAY_ADDRESS, the Ray dashboard's URL "
                                  "(e.g. http://ray-head:8265)", "RAY_ADDRESS")
            if self.address == "auto" or self.address.startswith("ray://"):
                raise StudioError(f"{self.address!r} is not a Ray dashboard URL; the Jobs API needs one "
                                  "such as http://ray-head:8265", "RAY_ADDRESS")
            try:
                self._client = _client_class()(self.address, self.timeout_s)
            except (OSError, RuntimeError, ValueError, KeyError) as e:  # requests' errors are OSErrors
                raise self._unreachable(e) from None
        return self._client

    def ask(self, method: str, *args, **kwargs):
        """``client().<method>(...)``: LookupError when Ray does not know the job; StudioError (naming
        RAY_ADDRESS) when the cluster cannot be asked or refuses."""
        client = self.client()
        try:
            return getattr(client, method)(*args, **kwargs)
        except OSError as e:  # requests' errors, timeouts included
            raise self._unreachable(e) from None
        except RuntimeError as e:  # the client's "Request failed with status code N: ..."
            if "status code 404" in str(e):
                raise LookupError(f"the Ray cluster at {self.address} has no job {args[0] if args else ''}") from None
            raise StudioError(f"the Ray cluster at {self.address} answered: {e}", "RAY_ADDRESS") from None

    def check(self, num_gpus: int = 0) -> None:
        """StudioError when the cluster is unset or unreachable, or has no node with ``num_gpus`` GPUs."""
        client = self.client()
        if num_gpus <= 0:
            return
        try:  # the state API (what `ray list nodes` reads) over HTTP, with the client's auth and timeout
            r = client._do_request("GET", "/api/v0/nodes", params={"detail": "1", "limit": "10000"})
            r.raise_for_status()
            nodes = r.json()["data"]["result"]["result"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise self._unreachable(e) from None
        gpus = [float((n.get("resources_total") or {}).get("GPU", 0)) for n in nodes if n.get("state") == "ALIVE"]
        most = max(gpus, default=0.0)
        if most <= 0:
            raise StudioError(f"this job needs {num_gpus} GPU(s) but the Ray cluster at {self.address} has no GPU "
                              f"({len(gpus)} node(s) up); use GPU nodes or SFT_STUDIO_JOBS=local", "RAY_ADDRESS")
        if most < num_gpus:  # a job's entrypoint runs on one node
            raise StudioError(f"this job needs {num_gpus} GPUs on one node; the largest node of the Ray cluster "
                              f"at {self.address} has {most:g}", "RAY_ADDRESS")

    def start(self, argv: list[str], env: Mapping[str, str], log_path: str | Path, num_gpus: int = 0,
              job_id: str = "job") -> RayHandle:
        self.check(num_gpus)
        log_path = os.path.abspath(log_path)
        sid = f"sft-{re.sub(r'[^A-Za-z0-9_-]', '-', job_id)}-{uuid.uuid4().hex[:8]}"
        env_vars = {k: v for k, v in env.items() if k.startswith(RAY_ENV_PREFIXES) or k in RAY_ENV_NAMES}
        env_vars["RAY_JOB_STOP_WAIT_TIME_S"] = str(int(self.stop_wait_s))  # read by Ray's job supervisor
        # sh sends its own output to the log, enters the working directory, then becomes the worker
        entrypoint = f"exec >>{shlex.quote(log_path)} 2>&1; cd {shlex.quote(os.getcwd())} && exec {shlex.join(argv)}"
        self.ask("submit_job", entrypoint=entrypoint, submission_id=sid, entrypoint_num_cpus=1,
                 entrypoint_num_gpus=num_gpus or None, runtime_env={"env_vars": env_vars})
        return RayHandle(self, sid, log_path)

    def _status(self, ref: str) -> str | None:
        """Ray's status of the job; "UNKNOWN" when Ray cannot be asked; None when Ray does not know it."""
        if not ref.startswith("ray:"):
            raise StudioError(f"not a Ray worker reference: {ref!r}", "ref")
        try:
            status = self.ask("get_job_status", ref[len("ray:"):])
        except StudioError as e:
            log.warning("cannot ask Ray about %s: %s", ref, e)
            return "UNKNOWN"
        except LookupError:  # Ray does not know the job (deleted, or another cluster)
            return None
        return str(getattr(status, "value", status))

    def alive(self, ref: str) -> bool:
        """Whether the Ray job is PENDING or RUNNING. True when Ray cannot be asked: the job's heartbeat
        going stale settles it (reconcile), not a dashboard restart."""
        return self._status(ref) in ("PENDING", "RUNNING", "UNKNOWN")

    def waiting(self, ref: str) -> bool:
        """Whether the job waits for the cluster's resources (PENDING): its worker has not started, so
        it cannot heartbeat yet, and a silent job is not a hung one."""
        return self._status(ref) == "PENDING"


def backend_from_env(env: Mapping[str, str] | None = None) -> LocalBackend | RayBackend:
    """The backend ``SFT_STUDIO_JOBS`` names: ``local`` (default) or ``ray`` (with ``RAY_ADDRESS``;
    ``SFT_STUDIO_RAY_STOP_WAIT_S``: how long a stopped worker gets before SIGKILL, default 600)."""
    env = os.environ if env is None else env
    name = (env.get("SFT_STUDIO_JOBS") or "local").strip().lower()
    if name == "local":
        return LocalBackend()
    if name != "ray":
        raise StudioError(f"unknown job backend {name!r}; use one of: {', '.join(BACKENDS)}", "SFT_STUDIO_JOBS")
    wait = (env.get("SFT_STUDIO_RAY_STOP_WAIT_S") or "600").strip()
    if not wait.isdigit():
        raise StudioError(f"must be a whole number of seconds, not {wait!r}", "SFT_STUDIO_RAY_STOP_WAIT_S")
    return RayBackend(env.get("RAY_ADDRESS"), stop_wait_s=int(wait))


def backend_for_ref(ref: str, env: Mapping[str, str] | None = None) -> LocalBackend | RayBackend:
    """The backend that started the worker ``ref`` names (a job may outlive a change of SFT_STUDIO_JOBS)."""
    if ref.startswith("local:"):
        return LocalBackend()
    if ref.startswith("ray:"):
        return _ray_backend((os.environ if env is None else env).get("RAY_ADDRESS"))
    raise StudioError(f"unknown worker reference {ref!r}", "ref")


@functools.lru_cache(maxsize=8)
def _ray_backend(address: str | None) -> RayBackend:
    """One backend (and job client, whose creation is an HTTP round trip) per address: reconcile asks
    about every running Ray job each time it runs."""
    return RayBackend(address)
