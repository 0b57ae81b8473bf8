"""Process lifetime of the managed vLLM server: a supervisor between the app and vLLM, and the
app-side signal handlers that close engines on SIGTERM/SIGINT.

Why a supervisor. vLLM is several processes (the API server, its engine core, workers). The app
used to start the API server in a new session and stop the group from ``close()`` / ``atexit``; a
SIGTERM (default action: die without ``atexit``) or a crash of the app left the whole group
running, re-parented to PID 1, holding RAM (and the GPU) and a port. ``PR_SET_PDEATHSIG`` on the
vLLM child alone is not enough: it fires when the *thread* that forked the child exits (the app
starts and restarts vLLM from whatever thread needs it: a Gradio worker, the watchdog, a short-lived
restart thread), only the API server would get it, and ``preexec_fn`` is unsafe in a threaded app.

Layout::

    app  --Popen(start_new_session)-->  supervisor   (session and group leader: pgid = its pid)
                                          `-- vLLM API server        (same group; PDEATHSIG=SIGTERM)
                                                `-- engine core, workers  (same group)

* The supervisor (this file run as a script: stdlib only, nothing of the app imported) is a small,
  single-threaded process. It polls ``getppid()``: when the app dies for any reason, SIGKILL
  included, it is re-parented and notices within ``POLL_S``. It also stops on SIGTERM/SIGINT/SIGHUP
  and when the API server exits. Stopping = SIGTERM to its own process group, wait up to ``--grace``
  seconds for every other member to exit, SIGKILL what is left, then exit (mirroring the API
  server's exit status, so the app's watchdog reports vLLM's own code).
* It is a child subreaper (``PR_SET_CHILD_SUBREAPER``): vLLM processes orphaned by a crash of the
  API server become its children and are reaped there, not left as zombies (a container's PID 1 may
  not reap).
* The vLLM API server gets ``PR_SET_PDEATHSIG(SIGTERM)`` in the supervisor's ``preexec_fn`` (sound
  there: the supervisor has one thread, which lives as long as it does), so a supervisor killed on
  its own still takes vLLM down.
* The app keeps stopping the group itself (``_Server.stop``: SIGTERM the group, SIGKILL after the
  grace); the supervisor is what makes that happen when the app cannot.

App side: :func:`close_on_signals` installs SIGTERM/SIGINT handlers that run the given closers and
then hand the signal to the previous handler (or the default action). Call it from a ``main()``
only (the app's, ``sft-studio serve``), never at import time.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
POLL_S = 0.2  # how often the supervisor checks on its parent and on vLLM


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


def _prctl(libc, option: int, arg: int) -> bool:
    if libc is None or not hasattr(libc, "prctl"):
        return False
    return libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)) == 0


def group_members(pgid: int, exclude: int | None = None) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == exclude:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # state ppid pgrp ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            out.append(int(entry))
    return out


def _say(msg: str) -> None:
    try:
        print(f"[sft-studio supervisor {os.getpid()}] {msg}", flush=True)
    except OSError:
        pass


def supervise(cmd: list[str], parent_pid: int, grace_s: float, status_fd: int = -1) -> int:
    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: stop.append(s))  # reset to default in the exec'd child
    libc = _libc()
    _prctl(libc, PR_SET_CHILD_SUBREAPER, 1)
    me = os.getpid()
    if os.getppid() != parent_pid:
        _say(f"parent {parent_pid} is gone before vLLM started; not starting it")
        return 1

    def child_setup():  # runs in the forked child, before exec (the supervisor has a single thread)
        _prctl(libc, PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != me:  # the supervisor died before the flag took effect
            os._exit(1)

    try:
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=child_setup)
    except OSError as e:
        _say(f"cannot start vLLM: {e}")
        return 127
    if status_fd >= 0:
        try:
            os.write(status_fd, f"{child.pid}\n".encode())
            os.close(status_fd)
        except OSError:
            pass
    code: int | None = None

    def reap() -> bool:
        """Reap exited children (vLLM and orphans re-parented here); False when none is left."""
        nonlocal code
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            if pid == child.pid:
                code = os.waitstatus_to_exitcode(status)
                child.returncode = code

    mirror = False  # exit as vLLM exited (it stopped by itself, not on our signal or the app's death)
    while True:
        reap()
        if stop:
            reason = f"got signal {signal.Signals(stop[0]).name}"
            break
        if code is not None:
            reason, mirror = f"vLLM (pid {child.pid}) exited with code {code}", True
            break
        if os.getppid() != parent_pid:
            reason = f"the app (pid {parent_pid}) is gone"
            break
        time.sleep(POLL_S)

    pgid = os.getpgid(0)
    _say(f"{reason}; stopping process group {pgid}")
    try:
        os.killpg(pgid, signal.SIGTERM)  # this process too: its handler only records the signal
    except OSError:
        pass
    end = time.monotonic() + grace_s
    while group_members(pgid, exclude=me) and time.monotonic() < end:
        reap()
        time.sleep(0.1)
    for _ in range(10):  # SIGKILL whatever ignored SIGTERM (and whatever it forked meanwhile)
        left = group_members(pgid, exclude=me)
        if not left:
            break
        _say(f"still running after {grace_s:.0f}s: {left}; SIGKILL")
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.1)
        reap()
    reap()
    if mirror and code is not None and code < 0:
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # their disposition cannot be changed
            signal.signal(-code, signal.SIG_DFL)  # die as vLLM died, so the app reports vLLM's own status
        os.kill(me, -code)
        time.sleep(1)
    return code if mirror and code is not None and code >= 0 else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run a command in this process group; stop the group when the "
                                            "parent process dies, on SIGTERM/SIGINT/SIGHUP, or when the command exits.")
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--grace", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL")
    p.add_argument("--status-fd", type=int, default=-1, help="write the command's pid to this fd")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("no command given (after --)")
    return supervise(cmd, args.parent_pid, args.grace, args.status_fd)


# -- app side --------------------------------------------------------------------------------------
def close_on_signals(*closers, signals=(signal.SIGTERM, signal.SIGINT)) -> bool:
    """On SIGTERM/SIGINT run ``closers`` (each at most once, errors ignored), then let the signal
    take its previous course: the handler that was installed before, or the default action (for
    SIGTERM: the process ends by that signal, with its usual exit status). Call from ``main()``, in
    the main thread; signals whose handler was SIG_IGN stay ignored. Returns whether it installed.

    Servers that capture signals themselves (uvicorn) restore these handlers and re-raise the
    signal after their graceful shutdown, so the closers still run then.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    done = threading.Event()

    def close_all() -> None:
        if done.is_set():
            return
        done.set()
        for close in closers:
            try:
                close()
            except Exception as e:  # noqa: BLE001 - shutting down: report, go on with the rest
                print(f"error while closing on signal: {type(e).__name__}: {e}", file=sys.stderr)

    installed = False
    for sig in signals:
        previous = signal.getsignal(sig)
        if previous is signal.SIG_IGN:
            continue

        def handler(signum, frame, previous=previous):
            close_all()
            if callable(previous):
                return previous(signum, frame)  # e.g. SIGINT's default: KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

        signal.signal(sig, handler)
        installed = True
    return installed


if __name__ == "__main__":
    sys.exit(main())
