"""Shared bits of the benchmarks: machine description, load, result files, tables and plots.

Every bench writes ``bench/results/<name>.json`` (figures + machine) and ``<name>.md`` (the table it
printed), and a PNG plot when matplotlib is installed (it is in requirements/dev.lock).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
VENV_PY = ROOT / ".venv" / "bin" / "python"
# vLLM on this CPU machine, offline: the settings tests/conftest.py uses too.
VLLM_CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def python() -> str:
    """The project's interpreter (the venv's when it exists)."""
    return str(VENV_PY) if VENV_PY.exists() else sys.executable


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


def load_str() -> str:
    a, b, c = loadavg()
    return f"{a:.2f}/{b:.2f}/{c:.2f}"


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, load: what a figure means depends on all of them."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    gpu = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        gpu = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "mem_gib": mem_gib,
        "gpu": gpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_1_5_15": [round(x, 2) for x in loadavg()],
    }


def wait_quiet(max_load: float, timeout_s: float = 0.0, poll_s: float = 15.0) -> float:
    """Wait (up to ``timeout_s``) for the 1-minute load to drop below ``max_load``; returns the load."""
    deadline = time.monotonic() + timeout_s
    while True:
        load = loadavg()[0]
        if load < max_load or time.monotonic() >= deadline:
            return load
        time.sleep(poll_s)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:,.3g}" if abs(x) < 100 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def save(name: str, result: dict[str, Any], markdown: str) -> dict[str, Path]:
    """Write results/<name>.json and results/<name>.md (atomically) and print the markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"bench": name, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), **result}
    m = result["machine"]
    header = (f"# {name}\n\nMachine: {m['cpu_model']}, {m['cores']} cores, {m['mem_gib']} GiB"
              f"{', GPU ' + m['gpu'] if m['gpu'] else ', no GPU'}; load (1/5/15 min) at the end: "
              f"{'/'.join(str(x) for x in m['loadavg_1_5_15'])}. Finished {result['finished_at']}.\n\n")
    paths = {"json": RESULTS / f"{name}.json", "md": RESULTS / f"{name}.md"}
    for key, text in (("json", json.dumps(result, indent=2, default=str) + "\n"), ("md", header + markdown + "\n")):
        tmp = paths[key].with_suffix(paths[key].suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(paths[key])
    print(header + markdown, flush=True)
    print(f"\nresults: {paths['json'].relative_to(ROOT)}, {paths['md'].relative_to(ROOT)}", flush=True)
    return paths


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (it is in requirements/dev.lock; run ./scripts/setup.sh)",
              file=sys.stderr)
        return None
    return plt


def save_plot(fig, name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path.relative_to(ROOT)}", flush=True)
    return path


class Timer:
    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> "Timer":
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
