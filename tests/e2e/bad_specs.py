"""A table of invalid AugmentationRuns (no tests here): tests/e2e/test_reliability_specs.py applies each one.

Every case is a patch to ``BASE`` (a valid run on the rayjob launcher with a shared cluster) and the outcome
it must have:

- ``admission``: the API server refuses it (``kubectl apply --server-side --validate=strict`` fails, the API
  answers 400/422), and the message contains every string in ``words`` (they name the field);
- ``condition``: the API server accepts it, and the operator sets ``Ready=False`` with ``reason`` (any
  reason when None) and a message containing every string in ``words``, in phase ``phase`` (not checked
  when None).

Either way, no RayJob may be created for it and no storage folder may appear under its output.

Patches are deep-merged into ``BASE``; ``DELETE`` removes a key. ``OUT`` in a string becomes the test's own
output folder, ``FILE`` a regular file (so that ``FILE/...`` can never be a directory). ``xfail`` marks
a case whose expected outcome is the designed one but not what the product does today (a product bug,
described in the reason): the test is xfail(strict=True), so it fails loudly once fixed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import yaml

DELETE = object()
OUT = "@OUT@"
FILE = "@FILE@"

BASE: dict[str, Any] = {
    "task": {"kind": "gsm8k"},
    "data": {"seed": "/data/seed.jsonl"},
    "output": OUT,
    "loop": {"maxIterations": 2},
    "retry": {"maxAttempts": 2, "backoffSeconds": 1},
    "ray": {"launcher": "rayjob", "clusterSelector": {"ray.io/cluster": "shared"}},
}


@dataclass(frozen=True)
class Case:
    id: str
    patch: dict[str, Any]
    outcome: str  # admission | condition
    words: tuple[str, ...]
    reason: str | None = None  # condition: Ready=False reason
    phase: str | None = None  # condition: status.phase
    name: str | None = None  # metadata.name when the name itself is the problem
    xfail: str | None = None
    python_accepts: str | None = None  # admission cases the Python rules wrongly accept (a product bug)


def A(id: str, patch: dict[str, Any], *words: str, name: str | None = None, xfail: str | None = None,
      python_accepts: str | None = None) -> Case:
    return Case(id, patch, "admission", words, name=name, xfail=xfail, python_accepts=python_accepts)


def C(id: str, patch: dict[str, Any], reason: str | None, phase: str | None, *words: str,
      xfail: str | None = None) -> Case:
    return Case(id, patch, "condition", words, reason=reason, phase=phase, xfail=xfail)


OPENAI = {"kind": "openai", "endpoint": "https://llm.example/v1"}
TEMPLATE = {"launcher": "rayjob", "clusterSelector": DELETE}

# Objects the condition cases refer to, created in the namespace before any case runs.
_NAMELESS = {"headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [{"image": "ray:1"}]}}}}
NAMESPACE_OBJECTS: list[dict[str, Any]] = [
    {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "nokey", "labels": {"llm2llm.io/teacher-key": "true"}},
     "stringData": {"other": "x"}},
    {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "plain"}, "stringData": {"token": "x"}},
    {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "unpinned", "labels": {"llm2llm.io/teacher-key": "true"}},
     "stringData": {"token": "x"}},
    {"apiVersion": "v1", "kind": "Secret",
     "metadata": {"name": "pinned", "labels": {"llm2llm.io/teacher-key": "true"},
                  "annotations": {"llm2llm.io/allowed-endpoints": "https://api.openai.com/"}},
     "stringData": {"token": "x"}},
    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "empty"}, "data": {"x": "y"}},
    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "notyaml"},
     "data": {"rayClusterSpec": "headGroupSpec: [unclosed"}},
    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "nohead"},
     "data": {"rayClusterSpec": yaml.safe_dump({"workerGroupSpecs": []})}},
    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "nameless"},
     "data": {"rayClusterSpec": yaml.safe_dump(_NAMELESS)}},
]

CASES: list[Case] = [
    # --- types ---------------------------------------------------------------------------------
    A("type-maxIterations-string", {"loop": {"maxIterations": "three"}}, "spec.loop.maxIterations"),
    A("type-lr-string", {"student": {"training": {"lr": "fast"}}}, "spec.student.training.lr"),
    A("type-suspend-string", {"suspend": "yes"}, "spec.suspend"),
    A("type-maxIterations-numeric-string", {"loop": {"maxIterations": "3"}}, "spec.loop.maxIterations"),
    A("type-seed-number", {"data": {"seed": 42}}, "spec.data.seed"),
    A("type-selector-value-int", {"ray": {"clusterSelector": {"ray.io/cluster": 5}}}, "spec.ray.clusterSelector"),
    A("type-labels-not-a-list", {"task": {"kind": "classification", "labels": "yes,no"}}, "spec.task.labels"),
    A("type-data-null", {"data": None}, "spec.data"),
    # --- ranges --------------------------------------------------------------------------------
    A("range-maxIterations-0", {"loop": {"maxIterations": 0}}, "spec.loop.maxIterations"),
    A("range-maxIterations-101", {"loop": {"maxIterations": 101}}, "spec.loop.maxIterations"),
    A("range-temperature-3", {"teacher": {"temperature": 3}}, "spec.teacher.temperature"),
    A("range-topP-0-exclusive", {"teacher": {"topP": 0}}, "spec.teacher.topP"),
    A("range-batchSize-0", {"student": {"training": {"batchSize": 0}}}, "spec.student.training.batchSize"),
    A("range-maxLength-8", {"student": {"training": {"maxLength": 8}}}, "spec.student.training.maxLength"),
    A("range-dropout-1-exclusive", {"student": {"lora": {"dropout": 1.0}}}, "spec.student.lora.dropout"),
    A("range-zeroStage-4", {"student": {"deepspeed": {"zeroStage": 4}}}, "spec.student.deepspeed.zeroStage"),
    A("range-gpusPerWorker-17", {"student": {"gpusPerWorker": 17}}, "spec.student.gpusPerWorker"),
    A("range-maxAttempts-21", {"retry": {"maxAttempts": 21}}, "spec.retry.maxAttempts"),
    A("range-backoff-negative", {"retry": {"backoffSeconds": -1}}, "spec.retry.backoffSeconds"),
    A("range-deadline-0", {"activeDeadlineSeconds": 0}, "spec.activeDeadlineSeconds"),
    A("range-seedLimit-0", {"data": {"seedLimit": 0}}, "spec.data.seedLimit"),
    A("range-teacherTokens-0", {"budget": {"teacherTokens": 0}}, "spec.budget.teacherTokens"),
    # --- enums ---------------------------------------------------------------------------------
    A("enum-teacher-kind", {"teacher": {"kind": "gpt"}}, "spec.teacher.kind"),
    A("enum-precision", {"student": {"training": {"precision": "fp16"}}}, "spec.student.training.precision"),
    A("enum-launcher", {"ray": {"launcher": "kuberay"}}, "spec.ray.launcher"),
    A("enum-dedup", {"filters": {"dedup": "fuzzy"}}, "spec.filters.dedup"),
    # --- unknown fields ------------------------------------------------------------------------
    A("unknown-top-level", {"foo": 1}, "spec.foo"),
    A("unknown-nested", {"student": {"foo": 1}}, "spec.student.foo"),
    A("unknown-inline-api-key", {"teacher": {**OPENAI, "apiKey": "sk-inline"}}, "spec.teacher.apiKey"),
    A("unknown-ray-namespace", {"ray": {"namespace": "other"}}, "spec.ray.namespace"),
    # --- missing / empty -----------------------------------------------------------------------
    A("missing-data", {"data": DELETE}, "spec.data"),
    A("missing-seed", {"data": {"seed": DELETE, "test": "/data/test.jsonl"}}, "spec.data.seed"),
    A("missing-output", {"output": DELETE}, "spec.output"),
    A("empty-seed", {"data": {"seed": ""}}, "spec.data.seed"),
    A("secret-ref-without-key", {"teacher": {**OPENAI, "apiKeySecretRef": {"name": "k"}}},
      "spec.teacher.apiKeySecretRef.key"),
    # --- conflicting fields (CEL) --------------------------------------------------------------
    A("cel-openai-without-endpoint", {"teacher": {"kind": "openai"}}, "teacher.endpoint is required"),
    A("cel-jobs-api-without-address", {"ray": {"launcher": "jobs-api", "clusterSelector": DELETE}},
      "ray.address is required"),
    A("cel-selector-and-template", {"ray": {"clusterTemplate": "pool"}}, "mutually exclusive"),
    A("cel-classification-one-label", {"task": {"kind": "classification", "labels": ["yes"]}}, "task.labels"),
    A("cel-microbatch-above-batch", {"student": {"training": {"batchSize": 2, "microBatchSize": 4}}},
      "microBatchSize must not exceed batchSize"),
    A("cel-plateau-not-below-max", {"loop": {"maxIterations": 3, "stopWhen": {"plateau": {"iterations": 3}}}},
      "plateau.iterations must be smaller"),
    A("cel-student-template-without-input", {"task": {"studentTemplate": "Q: {question}"}},
      "studentTemplate must contain the {input} slot"),
    A("cel-teacher-template-without-input", {"task": {"teacherTemplate": "make {k} like {output}"}},
      "teacherTemplate must contain the {input} slot"),
    A("cel-openai-empty-endpoint", {"teacher": {"kind": "openai", "endpoint": ""}}, "teacher.endpoint"),
    A("cel-jobs-api-empty-address", {"ray": {"launcher": "jobs-api", "clusterSelector": DELETE, "address": ""}},
      "ray.address"),
    # --- huge ----------------------------------------------------------------------------------
    A("huge-student-template", {"task": {"studentTemplate": "{input}" + "x" * 16_001}},
      "spec.task.studentTemplate", "16000"),
    A("huge-teacher-template", {"task": {"teacherTemplate": "{input}" + "y" * 200_000}},
      "spec.task.teacherTemplate", "16000"),
    A("huge-label-list", {"task": {"kind": "classification", "labels": [f"l{i}" for i in range(1001)]}},
      "spec.task.labels", "1000"),
    # --- names ---------------------------------------------------------------------------------
    A("name-uppercase-underscore", {}, "metadata.name", name="Bad_Name"),
    # Nothing is downloaded from a model hub: an id the job would refuse on every attempt is refused here.
    A("student-hub-id", {"student": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct"}}, "student.model"),
    A("teacher-hub-id", {"teacher": {"kind": "vllm", "model": "Qwen/Qwen2.5-1.5B-Instruct"}}, "teacher.model"),
    A("name-64-chars", {}, "metadata.name", name="r" * 64),
    A("name-leading-dash", {}, "metadata.name", name="-run"),
    A("name-with-dot", {}, "metadata.name", name="run.v2"),
    # --- caught by the operator: references, storage, launchers --------------------------------
    C("secret-missing", {"teacher": {**OPENAI, "apiKeySecretRef": {"name": "absent", "key": "k"}}},
      "SecretNotFound", "Pending", "Secret", "absent"),
    C("secret-without-key", {"teacher": {**OPENAI, "apiKeySecretRef": {"name": "nokey", "key": "token"}}},
      "SecretKeyNotFound", "Pending", "nokey", "'token'"),
    # Listed by the opt-in label only: to the operator, a Secret its owner did not label does not exist.
    C("secret-not-opted-in", {"teacher": {**OPENAI, "apiKeySecretRef": {"name": "plain", "key": "token"}}},
      "SecretNotFound", "Pending", "plain", "llm2llm.io/teacher-key=true"),
    C("secret-opted-in-but-unpinned", {"teacher": {**OPENAI, "apiKeySecretRef": {"name": "unpinned", "key": "token"}}},
      "EndpointNotAllowed", "Pending", "unpinned", "not pinned"),
    # The attacker's URL tricks against a Secret pinned to https://api.openai.com/ (llm2llm.endpoints).
    C("secret-userinfo-bypass", {"teacher": {**OPENAI, "endpoint": "https://api.openai.com@attacker.example/v1",
                                             "apiKeySecretRef": {"name": "pinned", "key": "token"}}},
      "EndpointNotAllowed", "Pending", "user info"),
    C("secret-longer-host-bypass", {"teacher": {**OPENAI, "endpoint": "https://api.openai.com.attacker.example/v1",
                                                "apiKeySecretRef": {"name": "pinned", "key": "token"}}},
      "EndpointNotAllowed", "Pending", "not among the pinned endpoints"),
    C("mlflow-secret-not-opted-in", {"tracking": {"mlflow": {"trackingUri": "http://mlflow.example:5000",
                                                             "credentialsSecretRef": {"name": "plain", "key": "token"}}}},
      "SecretNotFound", "Pending", "llm2llm.io/mlflow-credentials=true"),
    # What run authors may point the operator at is the admin's list (test operators: TEST_TEMPLATES).
    C("template-not-allowed", {"ray": {**TEMPLATE, "clusterTemplate": "vetted-nowhere"}},
      "ClusterTemplateNotAllowed", "Pending", "vetted-nowhere", "allowedClusterTemplates"),
    C("ray-address-not-allowed", {"ray": {"launcher": "jobs-api", "clusterSelector": DELETE,
                                          "address": "http://169.254.169.254:8265"}},
      "RayAddressNotAllowed", "Failed", "169.254.169.254", "allowedRayAddresses"),
    C("secret-pinned-elsewhere", {"teacher": {**OPENAI, "apiKeySecretRef": {"name": "pinned", "key": "token"}}},
      "EndpointNotAllowed", "Pending", "https://llm.example/v1", "https://api.openai.com/"),
    C("template-missing", {"ray": {**TEMPLATE, "clusterTemplate": "absent"}},
      "ClusterTemplateNotFound", "Pending", "ConfigMap", "absent"),
    C("template-without-key", {"ray": {**TEMPLATE, "clusterTemplate": "empty"}},
      "ClusterTemplateInvalid", "Pending", "rayClusterSpec"),
    C("template-not-yaml", {"ray": {**TEMPLATE, "clusterTemplate": "notyaml"}},
      "ClusterTemplateInvalid", "Pending", "not valid YAML"),
    C("template-without-head", {"ray": {**TEMPLATE, "clusterTemplate": "nohead"}},
      "ClusterTemplateInvalid", "Pending", "headGroupSpec"),
    C("template-rejected-by-kuberay", {"ray": {**TEMPLATE, "clusterTemplate": "nameless"}},
      "JobRejected", "Pending", "containers[0].name"),
    C("output-unknown-scheme", {"output": "foo://bucket/runs"}, "OutputUnsupported", "Failed", "spec.output", "foo"),
    # (s3fs is installed with the operator since object storage landed: abfs:// is a scheme with no driver here.)
    C("output-abfs-without-driver", {"output": "abfs://container/runs"}, "OutputUnsupported", "Failed", "adlfs"),
    C("output-gcs-without-driver", {"output": "gs://bucket/runs"}, "OutputUnsupported", "Failed", "gcsfs"),
    C("output-empty-scheme", {"output": "://runs"}, "OutputUnsupported", "Failed", "spec.output", "not a URI scheme"),
    # Data URIs that no driver installed with the operator (the job images have the same ones) can serve.
    C("seed-unknown-scheme", {"data": {"seed": "foo://bucket/seed.jsonl"}}, "DataUnsupported", "Failed",
      "spec.data.seed", "unknown URI scheme 'foo'"),
    C("seed-gcs-without-driver", {"data": {"seed": "gs://bucket/seed.jsonl"}}, "DataUnsupported", "Failed",
      "spec.data.seed", "gcsfs"),
    C("seed-chained-without-driver", {"data": {"seed": "simplecache::gs://bucket/seed.jsonl"}}, "DataUnsupported",
      "Failed", "spec.data.seed", "gcsfs"),
    C("seed-uppercase-scheme", {"data": {"seed": "S3://bucket/seed.jsonl"}}, "DataUnsupported", "Failed",
      "spec.data.seed", "lowercase: s3://"),
    C("seed-empty-scheme", {"data": {"seed": "://seed.jsonl"}}, "DataUnsupported", "Failed", "spec.data.seed",
      "not a URI scheme"),
    C("test-unknown-scheme", {"data": {"test": "foo://bucket/test.jsonl"}}, "DataUnsupported", "Failed",
      "spec.data.test", "unknown URI scheme 'foo'"),
    C("output-relative", {"output": "runs"}, "RelativePath", "Failed", "spec.output", "--base-dir"),
    C("seed-relative", {"data": {"seed": "data/seed.jsonl"}}, "RelativePath", "Failed", "spec.data.seed"),
    C("rayjob-without-cluster", {"ray": {"launcher": "rayjob", "clusterSelector": DELETE}},
      "NoRayCluster", "Failed", "clusterSelector", "clusterTemplate"),
    C("jobs-api-without-address", {"ray": {"launcher": "local", "clusterSelector": DELETE}},
      "NoRayAddress", "Failed", "address"),
    C("output-unreachable", {"output": FILE + "/runs"}, "StorageUnavailable", "Pending", "spec.output", FILE,
      "Not a directory"),
    # The operator judges a data path where it sees its folder (FILE's folder exists; /data does not here).
    C("seed-file-absent", {"data": {"seed": FILE + ".missing.jsonl"}}, "DataNotFound", "Failed", "spec.data.seed",
      ".missing.jsonl"),
    C("test-file-absent", {"data": {"test": FILE + ".test.jsonl"}}, "DataNotFound", "Failed", "spec.data.test"),
    C("seed-is-a-folder", {"data": {"seed": OUT}}, "DataNotFound", "Failed", "spec.data.seed", "not a file"),
]


def manifest(case: Case, out: str, file: str) -> dict[str, Any]:
    """The AugmentationRun of one case."""
    spec = _merge(copy.deepcopy(BASE), case.patch)  # (no deepcopy of the patch: it would copy DELETE too)
    spec = _subst(spec, out, file)
    name = case.name or case.id.lower()[:63]
    return {"apiVersion": "llm2llm.io/v1alpha1", "kind": "AugmentationRun", "metadata": {"name": name},
            "spec": spec}


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    for key, value in patch.items():
        if value is DELETE:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _merge(base[key], value)
        else:
            base[key] = _strip(value)
    return base


def _strip(value: Any) -> Any:
    """A deep copy without DELETE markers."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if v is not DELETE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _subst(value: Any, out: str, file: str) -> Any:
    if isinstance(value, str):
        return value.replace(OUT, out).replace(FILE, file)
    if isinstance(value, dict):
        return {k: _subst(v, out, file) for k, v in value.items()}
    if isinstance(value, list):
        return [_subst(v, out, file) for v in value]
    return value


assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
assert len({(c.name or c.id.lower()) for c in CASES}) == len(CASES), "run names must be unique"
