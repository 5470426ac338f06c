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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (versitygw, tests/s3server.py) on 127.0.0.1 with one bucket, for the session:
    yields its S3Endpoint (url, access_key, secret_key, bucket, env()). Skips only where Go is missing."""
    from tests.s3server import GoMissing, S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"))
    try:
        endpoint = server.start()
    except GoMissing as err:
        pytest.skip(str(err))
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """``s3_server`` with its AWS_* variables set in this process (and inherited by the processes it starts), as
    a job's pod has them; s3fs instances made under other settings are dropped."""
    import s3fs

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()
