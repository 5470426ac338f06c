"""`llm2llm-operator` / `python -m llm2llm_operator`: run the operator (Kopf) with the given settings."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from typing import Callable

import kopf
from kubernetes import client, config

from llm2llm.jobsapi import JobsApiLauncher

from . import handlers, metrics
from .reconcile import Context
from .settings import parse_args


def _api_client(workers: int) -> client.ApiClient:
    """In-cluster service account when there is one, else KUBECONFIG / ~/.kube/config (as Kopf does). One
    pooled connection per handler thread: with fewer, urllib3 opens a fresh TLS connection per extra request
    and drops it after."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    conf = client.Configuration.get_default_copy()
    conf.connection_pool_maxsize = max(conf.connection_pool_maxsize or 0, workers)
    return client.ApiClient(conf)


def _jobs_api_cache() -> Callable[[str], JobsApiLauncher]:
    """One Jobs API client per dashboard address (creating one contacts the cluster)."""
    cache: dict[str, JobsApiLauncher] = {}
    guard = threading.Lock()

    def get(address: str) -> JobsApiLauncher:
        with guard:
            if address in cache:
                return cache[address]
        launcher = JobsApiLauncher(address)  # outside the lock: it may wait on the network
        with guard:
            return cache.setdefault(address, launcher)

    return get


class _QuietTimer(logging.Filter):
    """Kopf logs every successful timer run at INFO: once per run per interval, pure noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timer 'timer' succeeded")


def _identity() -> str:
    """Kopf's peering id. Its default asks the passwd database for the user name, which fails for a uid
    with no entry (a pod's runAsUser, OpenShift's arbitrary uids): the pod's hostname is unique anyway."""
    return f"{socket.gethostname()}@{os.getpid()}"


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    kopf.configure(verbose=cfg.verbose, log_format=kopf.LogFormat.PLAIN)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietTimer())
    handlers.register(Context.connect(cfg, _api_client(cfg.workers), _jobs_api_cache()))
    if cfg.metrics_port:
        metrics.serve(cfg.metrics_port)
    kopf.run(
        identity=_identity(),
        standalone=cfg.peering is None,
        peering_name=cfg.peering,
        priority=cfg.priority,
        clusterwide=cfg.clusterwide,
        namespaces=list(cfg.namespaces),
        liveness_endpoint=cfg.liveness,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
