"""Shared test settings: every heavy library writes under the test's own tmp, offline, on CPU."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GSM8K = SHARED / "data" / "gsm8k"

# One scratch root per test session; libraries default to ~ and /tmp otherwise.
_SCRATCH = pathlib.Path(os.environ.get("LLM2LLM_TEST_TMP") or tempfile.mkdtemp(prefix="llm2llm-tests-"))
_DEFAULTS = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "DS_ACCELERATOR": "cpu",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "VLLM_CACHE_ROOT": str(_SCRATCH / "vllm-cache"),
    "TORCH_EXTENSIONS_DIR": os.path.expanduser("~/.cache/llm2llm/torch_extensions"),
}
for _k, _v in _DEFAULTS.items():
    os.environ.setdefault(_k, _v)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_gpu = shutil.which("nvidia-smi") is not None
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(pytest.mark.skip(reason="slow variant: pass --run-slow"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a GPU"))


@pytest.fixture(scope="session")
def scratch() -> pathlib.Path:
    return _SCRATCH
