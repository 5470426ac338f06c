"""Operator settings: command-line flags, each with an LLM2LLM_* environment variable as its default."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from llm2llm.endpoints import EndpointError, parse_endpoint

LAUNCHERS = ("jobs-api", "rayjob")


@dataclass(frozen=True)
class Settings:
    namespaces: tuple[str, ...] = ()  # empty: every namespace (cluster-wide)
    default_launcher: str = "rayjob"  # for runs whose spec.ray.launcher is `local`
    ray_address: str | None = None  # default Ray dashboard address for jobs-api runs
    interval: float = 30.0  # reconcile timer, seconds
    workers: int = 16  # handler threads (each reconcile mostly waits on the API server)
    job_python: str = "python"  # interpreter in the job entrypoint (spec.ray.python wins)
    base_dir: str | None = None  # relative local paths in a spec resolve against this
    metrics_port: int = 8000  # 0: no metrics server
    liveness: str | None = None  # e.g. http://0.0.0.0:8080/healthz
    peering: str | None = None  # Kopf peering name; None: standalone (one replica)
    priority: int = 0
    verbose: bool = False
    # What run authors may point the operator at (set by the cluster admin in the chart): spec.ray.address
    # values (URL prefixes; the operator's own ray_address is always allowed) and spec.ray.clusterTemplate
    # ConfigMaps ("name" in any watched namespace, or "namespace/name"; globs allowed).
    allowed_ray_addresses: tuple[str, ...] = ()
    allowed_cluster_templates: tuple[str, ...] = ()

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(f"LLM2LLM_{name}")
    return value if value not in (None, "") else default


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(
        prog="llm2llm-operator",
        description="Kubernetes operator for AugmentationRun (llm2llm.io/v1alpha1): one Ray job per iteration.",
    )
    p.add_argument("-n", "--namespace", action="append", dest="namespaces",
                   help="namespace to watch (repeatable; globs allowed). Default: $LLM2LLM_NAMESPACES "
                        "(comma-separated), else all namespaces")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    p.add_argument("--default-launcher", choices=LAUNCHERS, default=_env("DEFAULT_LAUNCHER", "rayjob"),
                   help="launcher for runs with spec.ray.launcher=local ($LLM2LLM_DEFAULT_LAUNCHER)")
    p.add_argument("--ray-address", default=_env("RAY_ADDRESS"),
                   help="default Ray dashboard address for jobs-api runs, e.g. http://head:8265 ($LLM2LLM_RAY_ADDRESS)")
    p.add_argument("--interval", type=float, default=float(_env("RECONCILE_INTERVAL", "30")),
                   help="seconds between reconciles of each run ($LLM2LLM_RECONCILE_INTERVAL)")
    p.add_argument("--workers", type=int, default=int(_env("WORKERS", "16")),
                   help="reconciles that may run at once, across all runs; each mostly waits on the API server "
                        "($LLM2LLM_WORKERS)")
    p.add_argument("--job-python", default=_env("JOB_PYTHON", "python"),
                   help="interpreter of the job entrypoint; use an absolute path ($LLM2LLM_JOB_PYTHON)")
    p.add_argument("--base-dir", default=_env("BASE_DIR"),
                   help="folder that relative local paths in a spec resolve against ($LLM2LLM_BASE_DIR)")
    p.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", "8000")),
                   help="Prometheus metrics port, 0 to disable ($LLM2LLM_METRICS_PORT)")
    p.add_argument("--liveness", default=_env("LIVENESS"),
                   help="Kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz ($LLM2LLM_LIVENESS)")
    p.add_argument("--peering", default=_env("PEERING"),
                   help="Kopf peering name for several replicas (needs Kopf's peering CRDs); default: standalone")
    p.add_argument("--priority", type=int, default=int(_env("PRIORITY", "0")), help="Kopf peering priority")
    p.add_argument("--allowed-ray-address", action="append", dest="ray_addresses",
                   help="a Ray dashboard URL (prefix) that spec.ray.address may name (repeatable). Default: "
                        "$LLM2LLM_ALLOWED_RAY_ADDRESSES (comma-separated), else none but --ray-address")
    p.add_argument("--allowed-cluster-template", action="append", dest="templates",
                   help="a ConfigMap that spec.ray.clusterTemplate may name: NAME (any watched namespace) or "
                        "NAMESPACE/NAME, globs allowed (repeatable). Default: $LLM2LLM_ALLOWED_CLUSTER_TEMPLATES "
                        "(comma-separated), else none")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    if a.interval <= 0:
        p.error("--interval must be positive")
    if a.workers < 1:
        p.error("--workers must be at least 1")
    namespaces: list[str] = [] if a.all_namespaces else (a.namespaces or [])
    if not a.all_namespaces and not namespaces:
        namespaces = [n.strip() for n in (_env("NAMESPACES") or "").split(",") if n.strip()]
    base_dir = os.path.abspath(a.base_dir) if a.base_dir else None
    ray_addresses = tuple(a.ray_addresses or _list("ALLOWED_RAY_ADDRESSES"))
    for address in ray_addresses:
        try:
            parse_endpoint(address)
        except EndpointError as err:
            p.error(f"--allowed-ray-address: {err}")
    return Settings(
        namespaces=tuple(namespaces), default_launcher=a.default_launcher, ray_address=a.ray_address,
        interval=a.interval, workers=a.workers, job_python=a.job_python, base_dir=base_dir, metrics_port=a.metrics_port,
        liveness=a.liveness, peering=a.peering, priority=a.priority, verbose=a.verbose,
        allowed_ray_addresses=ray_addresses, allowed_cluster_templates=tuple(a.templates or _list("ALLOWED_CLUSTER_TEMPLATES")),
    )


def _list(name: str) -> list[str]:
    return [v.strip() for v in (_env(name) or "").split(",") if v.strip()]
