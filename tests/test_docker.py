"""deploy/Dockerfile and .dockerignore, checked statically (no Docker engine on these machines).

The dependency step of the build stage is not only read but run: its shell script is executed
with a stand-in ``pip`` that records what it is asked to install, for VARIANT=cpu and gpu, and the
result is compared with the lock files and the Makefile's install.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "deploy" / "Dockerfile"


def parse_dockerfile(text: str) -> list[dict]:
    """Stages ``{"from", "name", "args", "instructions": [(INSTR, rest)]}``; continuation
    lines joined, comments dropped."""
    lines, cur = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") and not cur:
            continue
        if raw.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if raw.rstrip().endswith("\\"):
            cur += raw.rstrip()[:-1] + "\n"
            continue
        cur += raw
        if cur.strip():
            lines.append(cur.strip())
        cur = ""
    stages, global_args = [], {}
    for line in lines:
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            stages.append({"from": m.group(1), "name": m.group(2), "args": {}, "instructions": []})
        elif not stages:
            if instr == "ARG":
                k, _, v = rest.partition("=")
                global_args[k] = v
        else:
            if instr == "ARG":
                k, _, v = rest.partition("=")
                stages[-1]["args"][k] = v
            stages[-1]["instructions"].append((instr, rest.strip()))
    for s in stages:
        s["global_args"] = global_args
    return stages


STAGES = parse_dockerfile(DOCKERFILE.read_text())
BUILD = next(s for s in STAGES if s["name"] == "build")
FINAL = STAGES[-1]


def instrs(stage: dict, name: str) -> list[str]:
    return [rest for instr, rest in stage["instructions"] if instr == name]


def test_multi_stage_final_image_runs_mixrank_as_non_root():
    assert len(STAGES) >= 2 and FINAL is not BUILD
    assert any("--from=build" in c for c in instrs(FINAL, "COPY"))
    users = instrs(FINAL, "USER")
    assert users, "final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, "USER must be a numeric non-root uid"
    # Nothing runs as root after the switch.
    after = FINAL["instructions"][[i for i, _ in FINAL["instructions"]].index("USER") :]
    assert not [r for i, r in after if i == "RUN"]
    assert json.loads(instrs(FINAL, "ENTRYPOINT")[-1]) == ["mixrank"]
    # The base image's python is the one the copied venv links to.
    assert FINAL["from"] == BUILD["from"]


def test_variant_argument_defaults_to_cpu():
    assert BUILD["args"]["VARIANT"] == "cpu"
    assert FINAL["args"]["VARIANT"] == "cpu"


def _install_script() -> str:
    (run,) = [r for r in instrs(BUILD, "RUN") if "requirements-nodeps.lock" in r]
    return run


def _run_install(variant: str, tmp_path: Path) -> tuple[int, list[list[str]], dict[str, str]]:
    """Run the build stage's dependency RUN step with a recording ``pip``; returns the exit
    status, pip's argument lists and the content of every requirements file pip was given."""
    work = tmp_path / variant
    (work / "bin").mkdir(parents=True)
    (work / "scratch").mkdir()
    for f in ("requirements.lock", "requirements-nodeps.lock"):
        (work / f).write_text((REPO / f).read_text())
    log = work / "pip.log"
    pip = work / "bin" / "pip"
    pip.write_text(
        "#!/usr/bin/env python3\n"
        "import json, sys, os\n"
        "args = sys.argv[1:]\n"
        "files = {args[i + 1]: open(args[i + 1]).read() for i, a in enumerate(args) if a == '-r'}\n"
        f"open({str(log)!r}, 'a').write(json.dumps([args, files]) + '\\n')\n"
    )
    pip.chmod(pip.stat().st_mode | stat.S_IEXEC)
    script = _install_script().replace("/tmp/", f"{work}/scratch/")
    env = {
        "PATH": f"{work / 'bin'}:/usr/bin:/bin",
        "VARIANT": variant,
        "TORCH_CPU_INDEX": BUILD["args"]["TORCH_CPU_INDEX"],
    }
    proc = subprocess.run(
        ["sh", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=30
    )
    calls, files = [], {}
    if log.exists():
        for line in log.read_text().splitlines():
            args, fs = json.loads(line)
            calls.append(args)
            files.update(fs)
    return proc.returncode, calls, files


def _lock_lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def _makefile_installs() -> list[list[str]]:
    """The Makefile's `pip install` argument lists, without its quietness flags."""
    out = []
    for line in (REPO / "Makefile").read_text().splitlines():
        if "-m pip install" in line:
            args = shlex.split(line.split("-m pip install", 1)[1])
            out.append([a for a in args if a not in ("-q", "--disable-pip-version-check")])
    return out


def test_cpu_variant_installs_exactly_the_lock_files(tmp_path):
    rc, calls, files = _run_install("cpu", tmp_path)
    assert rc == 0
    lock = (REPO / "requirements.lock").read_text()
    torch_pin = next(ln for ln in _lock_lines(lock) if ln.startswith("torch=="))
    # 1. torch's CPU build of the locked version, from the CPU index only.
    assert calls[0] == ["install", "--index-url", BUILD["args"]["TORCH_CPU_INDEX"], torch_pin]
    # 2-3. The Makefile's two steps: the lock (unchanged), then the no-deps lock.
    make_lock, make_nodeps = _makefile_installs()[:2]
    assert make_lock == ["-r", "requirements.lock"]
    assert make_nodeps == ["--no-deps", "-r", "requirements-nodeps.lock"]
    (lock_arg,) = [calls[1][i + 1] for i, a in enumerate(calls[1]) if a == "-r"]
    assert calls[1] == ["install", "-r", lock_arg]
    assert files[lock_arg] == lock
    assert calls[2] == ["install", *make_nodeps]
    assert files["requirements-nodeps.lock"] == (REPO / "requirements-nodeps.lock").read_text()
    assert len(calls) == 3


def test_gpu_variant_swaps_fbgemm_for_the_same_version(tmp_path):
    rc, calls, files = _run_install("gpu", tmp_path)
    assert rc == 0
    assert not any("--index-url" in c for c in calls), "GPU torch comes from PyPI (CUDA build)"
    (lock_arg,) = [calls[0][i + 1] for i, a in enumerate(calls[0]) if a == "-r"]
    cpu = _lock_lines((REPO / "requirements.lock").read_text())
    gpu = _lock_lines(files[lock_arg])
    changed = [(a, b) for a, b in zip(cpu, gpu) if a != b]
    assert len(cpu) == len(gpu)
    (fb_cpu, fb_gpu) = changed[0]
    assert len(changed) == 1
    name_cpu, version = fb_cpu.split("==")
    assert name_cpu.lower().replace("_", "-") == "fbgemm-gpu-cpu"
    assert fb_gpu == f"fbgemm-gpu=={version}"
    assert calls[-1] == ["install", "--no-deps", "-r", "requirements-nodeps.lock"]


def test_unknown_variant_fails_the_build(tmp_path):
    rc, calls, _ = _run_install("tpu", tmp_path)
    assert rc != 0 and calls == []


def test_package_installed_like_the_makefile():
    make_pkg = _makefile_installs()[2]
    runs = instrs(BUILD, "RUN")
    assert any("pip install " + " ".join(make_pkg) in r for r in runs), make_pkg


def test_gpu_runtime_gets_a_c_compiler_for_triton():
    (run,) = [r for r in instrs(FINAL, "RUN") if "apt-get install" in r]
    assert re.search(r'VARIANT" = gpu \]; then extra="gcc', run)


# ------------------------------------------------------------------------------- .dockerignore
def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = os.path.normpath(line.lstrip("!")).lstrip("/")
        rules.append((neg, _pattern_regex(pat)))
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for neg, rx in rules:
        if any(rx.match(p) for p in prefixes):
            excluded = not neg
    return excluded


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        "runs/demo/metrics.jsonl",
        "data/x.parquet",
        ".git/HEAD",
        "helm/mixrank/values.yaml",
        "tests/test_docker.py",
        "ranking/__pycache__/cli.cpython-311.pyc",
    ],
)
def test_dockerignore_keeps_out(path):
    assert dockerignored(path)


def test_everything_the_dockerfile_copies_is_in_the_context():
    for stage in STAGES:
        for rest in instrs(stage, "COPY"):
            if rest.startswith("--from"):
                continue
            *sources, _dest = shlex.split(rest)
            for src in sources:
                assert (REPO / src).exists(), src
                assert not dockerignored(src), f"{src} is copied but .dockerignore drops it"
                if (REPO / src).is_dir():
                    py = next((REPO / src).rglob("*.py"), None)
                    if py:
                        assert not dockerignored(str(py.relative_to(REPO)))
