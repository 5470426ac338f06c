"""The AugmentationRun spec: the single source of truth for run.yaml, the CRD and the jobs' config.

Field names are camelCase on the wire (YAML, CRD) and snake_case in Python. Rules that span fields are
declared once in ``CROSS_FIELD_RULES``: each carries its CEL expression (enforced by the API server) and
the same check in Python (enforced by ``llm2llm validate`` and the local runner).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

GROUP = "llm2llm.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "AugmentationRun"
PLURAL = "augmentationruns"

# Kubernetes object names (RFC 1123 subdomain, kept to 63 so child names can be derived from them).
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_TEMPLATE_CHARS = 16_000
# Models the jobs prepare offline by name (llm2llm_jobs.models; a test keeps the two lists equal). Anything else
# is a local folder in Hugging Face layout: nothing is ever downloaded from a model hub.
BUILTIN_MODELS = ("smollm2-135m", "tiny-llama", "qwen2.5-coder-1.5b")
_MODEL_HELP = ("A built-in name (" + ", ".join(BUILTIN_MODELS) + ") or a local folder in Hugging Face layout: an "
               "absolute path, or ./relative (to llm2llm run's working directory, the operator's --base-dir). "
               "Hub ids are refused: nothing is downloaded.")


class _Model(BaseModel):
    # strict: no coercion ('yes' -> true, '3' -> 3), so `llm2llm validate` refuses what the API server
    # refuses. (Strict still takes an int for a float field, as the CRD's `number` type does.)
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True, strict=True
    )


class SecretKeyRef(_Model):
    """A key in a Kubernetes Secret. Secrets are only ever referenced, never inlined."""

    name: str = Field(min_length=1, max_length=253, description="Secret name, in the run's namespace.")
    key: str = Field(min_length=1, max_length=253, description="Key inside the Secret.")


class TaskSpec(_Model):
    kind: Literal["gsm8k", "classification", "exact"] = Field(
        "gsm8k",
        description="gsm8k: numeric answer after '####'. classification: the label after the prompt. "
        "exact: the whole answer, whitespace-normalised.",
    )
    student_template: str | None = Field(
        None,
        max_length=MAX_TEMPLATE_CHARS,
        description="Student prompt with an {input} slot. Built-in per task when omitted.",
    )
    teacher_template: str | None = Field(
        None,
        max_length=MAX_TEMPLATE_CHARS,
        description="Teacher request with {input}, {output} and {k} slots. Built-in per task when omitted.",
    )
    labels: list[str] | None = Field(
        None, max_length=1000, description="Allowed labels (classification). Outputs outside are rejected."
    )


class DataSpec(_Model):
    seed: str = Field(min_length=1, description="Seed set URI (local path, file://, s3://...): JSONL or Parquet.")
    test: str | None = Field(None, description="Held-out eval set URI: accuracy and decontamination.")
    input_field: str = Field("question", min_length=1, description="Column holding the input.")
    output_field: str = Field("answer", min_length=1, description="Column holding the gold output.")
    seed_limit: int | None = Field(None, ge=1, description="Use only the first N seed rows.")
    test_limit: int | None = Field(None, ge=1, description="Use only the first N test rows.")


class LoraSpec(_Model):
    r: int = Field(8, ge=1, le=1024)
    alpha: int = Field(16, ge=1, le=4096)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)


class TrainingSpec(_Model):
    epochs: float = Field(3.0, gt=0, le=1000, description="Epochs over the cumulative data (ignored when steps is set).")
    steps: int | None = Field(
        None, ge=1, description="Fixed optimizer steps per iteration, so more data does not mean more training."
    )
    lr: float = Field(2.0e-5, gt=0, le=1.0)
    batch_size: int = Field(8, ge=1, le=65536, description="Effective (global) batch size.")
    micro_batch_size: int = Field(4, ge=1, le=4096, description="Per-worker micro-batch size.")
    max_length: int = Field(512, ge=16, le=131072)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    seed: int = Field(1, ge=0)
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="auto: bf16 when every training worker computes it natively (a CUDA GPU with bf16, or a CPU "
        "with AVX512-BF16 or AMX), else fp32. A CPU without them emulates bf16 about 15x slower than fp32.",
    )
    gradient_checkpointing: bool = False


class DeepSpeedSpec(_Model):
    zero_stage: int = Field(2, ge=0, le=3)
    offload: Literal["none", "cpu"] = "none"


class StudentSpec(_Model):
    model: str = Field("smollm2-135m", min_length=1, description=_MODEL_HELP)
    method: Literal["lora", "full"] = "lora"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    workers: int = Field(1, ge=1, le=1024, description="Ray Train workers.")
    gpus_per_worker: int = Field(0, ge=0, le=16, description="0 trains on CPU (gloo).")
    cpus_per_worker: int = Field(1, ge=1, le=256)


class InferSpec(_Model):
    backend: Literal["auto", "vllm", "hf"] = Field("auto", description="auto: vLLM when importable, else HF generate.")
    max_tokens: int = Field(256, ge=1, le=32768)
    batch_size: int = Field(64, ge=1, le=65536)
    replicas: int = Field(1, ge=1, le=1024, description="Data-parallel inference engines.")


class TeacherSpec(_Model):
    kind: Literal["vllm", "openai", "hf"] = "vllm"
    model: str = Field("smollm2-135m", min_length=1,
                       description="kind vllm/hf: " + _MODEL_HELP + " kind openai: the endpoint's model name.")
    endpoint: str | None = Field(None, min_length=1, description="OpenAI-compatible base URL (kind openai).")
    api_key_secret_ref: SecretKeyRef | None = None
    samples_per_failure: int = Field(1, ge=1, le=64)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1, le=32768)
    replicas: int = Field(1, ge=1, le=1024)
    tensor_parallel: int = Field(1, ge=1, le=64)
    max_concurrency: int = Field(8, ge=1, le=4096, description="Requests in flight (kind openai).")
    max_rounds: int = Field(3, ge=1, le=20, description="Bounded retries asking for more candidates.")
    show_student_answer: bool = Field(False, description="Show the student's wrong answer to the teacher.")
    structured_output: bool = Field(
        True,
        description="Constrain teacher replies to a JSON schema derived from the task (vLLM structured outputs; "
        "response_format for kind openai, falling back to the text format when the endpoint refuses it). "
        "false: numbered Question/Answer text, parsed.",
    )
    request_timeout_seconds: float = Field(120, gt=0, le=3600)
    keep_label: bool = Field(
        False,
        description="classification: the teacher writes new inputs for the seed example's gold label, and each "
        "new row's label is that gold label, never the label the teacher wrote. false: the teacher writes input "
        "and label, and its label is trained on. Best with filters.verify.relabel (docs/teacher.md). Ignored by "
        "other task kinds.",
    )


class PlateauSpec(_Model):
    iterations: int = Field(3, ge=1, description="Stop when the last N iterations together gained less than minGain.")
    min_gain: float = Field(0.005, ge=0, le=1)


class StopWhenSpec(_Model):
    no_failures: bool = True
    plateau: PlateauSpec | None = None


class LoopSpec(_Model):
    max_iterations: int = Field(3, ge=1, le=100)
    stop_when: StopWhenSpec = Field(default_factory=StopWhenSpec)
    select: Literal["failures", "random"] = Field(
        "failures",
        description="Which seed examples go to the teacher each round. failures: the ones the student got wrong "
        "(LLM2LLM). random: seed examples drawn at random (seeded by student.training.seed and the iteration), "
        "a control for measuring what the failures add; needs rowsPerRound.",
    )
    rows_per_round: list[Annotated[int, Field(ge=0, le=1_000_000)]] | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="The most teacher rows round i adds (item i; the last item repeats). With select random the "
        "teacher is asked about 2 x ceil(n / samplesPerFailure) seed examples in a random order and the first n "
        "kept rows in that order are added. Unset: no cap.",
    )


class VerifySpec(_Model):
    arithmetic: bool = Field(
        True,
        description="gsm8k: recompute every 'a op b = c' step of a teacher's rationale (and '<<a*b=c>>' "
        "calculator annotations) with a safe arithmetic parser; reject the row when a step is wrong "
        "(verify_arithmetic) or the final answer is not the last step's result (verify_final).",
    )
    self_consistency: int = Field(
        0, ge=0, le=16,
        description="gsm8k: the teacher solves each new question this many more times (sampled); the row is kept "
        "only when more than half of those solutions reach its answer (else verify_consistency). 0: off.",
    )
    relabel: bool = Field(
        False,
        description="classification: the teacher labels each new input in a separate call (greedy); the row is "
        "kept only when that label is the row's label (else verify_label).",
    )


class FiltersSpec(_Model):
    dedup: Literal["none", "exact", "near"] = "near"
    near_threshold: float = Field(0.95, gt=0, le=1, description="ROUGE-L F1 above which a question is a duplicate.")
    decontaminate: bool = True
    max_output_chars: int = Field(4000, ge=1)
    verify: VerifySpec = Field(default_factory=VerifySpec, description="Checks of the teacher's answers; "
                               "the teacher-side ones (selfConsistency, relabel) cost teacher tokens.")


class BudgetSpec(_Model):
    teacher_tokens: int | None = Field(None, ge=1, description="Stop generating once this many teacher tokens are used.")
    gpu_hours: float | None = Field(None, gt=0)


class RaySpec(_Model):
    launcher: Literal["local", "jobs-api", "rayjob"] = "local"
    address: str | None = Field(None, min_length=1, description="Dashboard address for jobs-api, e.g. http://head:8265.")
    cluster_selector: dict[str, str] | None = Field(
        None, description="Labels of a shared RayCluster the RayJob runs on (rayjob launcher)."
    )
    cluster_template: str | None = Field(
        None, description="Name of a ConfigMap holding a RayCluster spec template (rayjob launcher)."
    )
    image: str | None = Field(None, description="Job image (the Dockerfile's job target).")
    python: str | None = Field(None, description="Interpreter for the job entrypoint; default: the submitting one.")
    keep_warm: bool = Field(
        True,
        description="Keep the run's vLLM engines (the student's base model for failure inference, which loads each "
        "iteration's LoRA adapter, and the teacher) and its training workers (the base model loaded, the stack "
        "imported, one process group) up across iterations, as named Ray actors on the run's Ray cluster, instead "
        "of starting them in every stage of every iteration. Removed when the run's last iteration commits, or "
        "after 15 minutes without a call; with a RayCluster per job (clusterTemplate) they live as long as the "
        "job. They take no Ray CPU; on GPUs they hold their GPUs between stages. false: a Ray Train worker group "
        "and fresh engines per stage.",
    )


class RetrySpec(_Model):
    max_attempts: int = Field(3, ge=1, le=20, description="Attempts per iteration.")
    backoff_seconds: int = Field(30, ge=0, le=86400)


class MlflowSpec(_Model):
    tracking_uri: str = Field(
        min_length=1, max_length=2048, description="MLflow tracking server, e.g. http://mlflow.mlflow:5000."
    )
    experiment: str = Field("llm2llm", min_length=1, max_length=500, description="Experiment the runs go into.")
    credentials_secret_ref: SecretKeyRef | None = Field(
        None,
        description="Secret key holding the MLflow credentials: a token (sent as a bearer token), or "
        "'username:password' (basic auth). Never logged.",
    )


class TrackingSpec(_Model):
    mlflow: MlflowSpec | None = Field(
        None, description="Log params, per-iteration metrics and artefacts to MLflow (one run per AugmentationRun)."
    )


class AugmentationRunSpec(_Model):
    task: TaskSpec = Field(default_factory=TaskSpec)
    data: DataSpec
    student: StudentSpec = Field(default_factory=StudentSpec)
    infer: InferSpec = Field(default_factory=InferSpec)
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    loop: LoopSpec = Field(default_factory=LoopSpec)
    filters: FiltersSpec = Field(default_factory=FiltersSpec)
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    output: str = Field(min_length=1, description="Output URI; the run writes under <output>/<name>/.")
    ray: RaySpec = Field(default_factory=RaySpec)
    retry: RetrySpec = Field(default_factory=RetrySpec)
    tracking: TrackingSpec | None = Field(None, description="Experiment tracking (MLflow).")
    suspend: bool = False
    active_deadline_seconds: int | None = Field(None, ge=1, description="Per iteration job.")
    delete_data: bool = Field(False, description="Delete the run's output when the resource is deleted.")

    @model_validator(mode="after")
    def _cross_field(self) -> AugmentationRunSpec:
        errors = [rule.message for rule in CROSS_FIELD_RULES if not rule.check(self)]
        if errors:
            raise ValueError("; ".join(errors))
        return self


@dataclass(frozen=True)
class Rule:
    """A rule across fields: ``cel`` runs in the API server, ``check`` in Python. Same meaning."""

    cel: str
    message: str
    check: Callable[[AugmentationRunSpec], bool]


def _has_slot(template: str | None, slot: str) -> bool:
    return template is None or ("{" + slot + "}") in template


_PATH_PREFIXES = ("/", "./", "../", "~/")


def _model_ok(model: str) -> bool:
    return model in BUILTIN_MODELS or model.startswith(_PATH_PREFIXES)


def _model_cel(field: str) -> str:
    names = ", ".join(f"'{m}'" for m in BUILTIN_MODELS)
    starts = " || ".join(f"{field}.startsWith('{p}')" for p in _PATH_PREFIXES)
    return f"{field} in [{names}] || {starts}"


CROSS_FIELD_RULES: list[Rule] = [
    Rule(
        "self.teacher.kind != 'openai' || has(self.teacher.endpoint)",
        "teacher.endpoint is required when teacher.kind is openai",
        lambda s: s.teacher.kind != "openai" or bool(s.teacher.endpoint),
    ),
    Rule(
        "self.ray.launcher != 'jobs-api' || has(self.ray.address)",
        "ray.address is required when ray.launcher is jobs-api",
        lambda s: s.ray.launcher != "jobs-api" or bool(s.ray.address),
    ),
    Rule(
        "!has(self.ray.clusterSelector) || !has(self.ray.clusterTemplate)",
        "ray.clusterSelector and ray.clusterTemplate are mutually exclusive",
        lambda s: s.ray.cluster_selector is None or s.ray.cluster_template is None,
    ),
    Rule(
        "self.task.kind != 'classification' || (has(self.task.labels) && size(self.task.labels) >= 2)",
        "task.labels needs at least 2 labels when task.kind is classification",
        lambda s: s.task.kind != "classification" or len(s.task.labels or []) >= 2,
    ),
    Rule(
        "self.student.training.microBatchSize <= self.student.training.batchSize",
        "student.training.microBatchSize must not exceed batchSize",
        lambda s: s.student.training.micro_batch_size <= s.student.training.batch_size,
    ),
    Rule(
        "!has(self.loop.stopWhen.plateau) || self.loop.stopWhen.plateau.iterations < self.loop.maxIterations",
        "loop.stopWhen.plateau.iterations must be smaller than loop.maxIterations",
        lambda s: s.loop.stop_when.plateau is None or s.loop.stop_when.plateau.iterations < s.loop.max_iterations,
    ),
    Rule(
        "self.loop.select != 'random' || has(self.loop.rowsPerRound)",
        "loop.rowsPerRound is required when loop.select is random",
        lambda s: s.loop.select != "random" or s.loop.rows_per_round is not None,
    ),
    Rule(
        _model_cel("self.student.model"),
        "student.model must be a built-in model (" + ", ".join(BUILTIN_MODELS) + ") or a local folder (/absolute or "
        "./relative): model hub ids cannot be downloaded",
        lambda s: _model_ok(s.student.model),
    ),
    Rule(
        "self.teacher.kind == 'openai' || " + _model_cel("self.teacher.model"),
        "teacher.model must be a built-in model (" + ", ".join(BUILTIN_MODELS) + ") or a local folder (/absolute or "
        "./relative) unless teacher.kind is openai: model hub ids cannot be downloaded",
        lambda s: s.teacher.kind == "openai" or _model_ok(s.teacher.model),
    ),
    Rule(
        "!has(self.task.studentTemplate) || self.task.studentTemplate.contains('{input}')",
        "task.studentTemplate must contain the {input} slot",
        lambda s: _has_slot(s.task.student_template, "input"),
    ),
    Rule(
        "!has(self.task.teacherTemplate) || self.task.teacherTemplate.contains('{input}')",
        "task.teacherTemplate must contain the {input} slot",
        lambda s: _has_slot(s.task.teacher_template, "input"),
    ),
]


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class AugmentationRun(BaseModel):
    """A whole resource as in run.yaml. Status is optional and validated separately."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")
    api_version: Literal["llm2llm.io/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["AugmentationRun"] = KIND
    metadata: ObjectMeta
    spec: AugmentationRunSpec
    status: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _name(self) -> AugmentationRun:
        name = self.metadata.name
        if len(name) > 63 or not NAME_RE.match(name):
            raise ValueError(
                f"metadata.name {name!r} must be a DNS label: lowercase letters, digits and '-', at most 63 chars"
            )
        return self


class SpecError(ValueError):
    """A run.yaml that cannot be used, with one line per problem (field path: message)."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid AugmentationRun:\n" + "\n".join(f"  - {p}" for p in problems))


def _problems(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        out.append(f"{loc}: {msg}" if loc else msg)
    return out


def parse_run(doc: Any, source: str = "<run>") -> AugmentationRun:
    """Validate a decoded run.yaml document, raising SpecError with field-level messages."""
    if not isinstance(doc, dict):
        raise SpecError(source, ["document must be a mapping with apiVersion, kind, metadata and spec"])
    try:
        return AugmentationRun.model_validate(doc)
    except ValidationError as err:
        raise SpecError(source, _problems(err)) from None


def parse_spec(spec: Any, source: str = "<spec>") -> AugmentationRunSpec:
    try:
        return AugmentationRunSpec.model_validate(spec)
    except ValidationError as err:
        raise SpecError(source, _problems(err)) from None


class _Yaml12Floats(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where ``2e-5`` (no dot) is a string; kubectl's parser reads it as a number.
    Strict validation would then refuse an ``lr: 2e-5`` that the API server takes, so read those as floats."""


_Yaml12Floats.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def load_run(path: str | Path) -> AugmentationRun:
    """Read and validate a run.yaml file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(str(p), [f"cannot read file: {err}"]) from None
    try:
        doc = yaml.load(text, Loader=_Yaml12Floats)
    except yaml.YAMLError as err:
        raise SpecError(str(p), [f"not valid YAML: {err}"]) from None
    except (ValueError, RecursionError) as err:  # an integer of 5000 digits, nesting thousands deep
        raise SpecError(str(p), [f"not usable YAML: {err}"]) from None
    run = parse_run(doc, str(p))
    return run


def prune_unknown(model: type[BaseModel], doc: Any, prefix: str = "") -> tuple[Any, list[str]]:
    """``doc`` without the fields ``model`` does not know (recursively), and their dotted paths. For a spec
    that comes from another version of llm2llm (an operator newer than this job image): its new fields are
    dropped with a warning rather than refused, so upgrading the operator first never breaks running jobs."""
    if not isinstance(doc, dict):
        return doc, []
    by_key = {}
    for name, info in model.model_fields.items():
        by_key[name] = info
        if info.alias:
            by_key[info.alias] = info
    out, dropped = {}, []
    for key, value in doc.items():
        info = by_key.get(key)
        if info is None:
            dropped.append(f"{prefix}{key}")
            continue
        sub = _model_of(info.annotation)
        if sub is not None and isinstance(value, dict):
            value, more = prune_unknown(sub, value, f"{prefix}{key}.")
            dropped += more
        out[key] = value
    return out, dropped


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel in ``X``, ``X | None`` or ``Optional[X]``, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def spec_to_wire(spec: AugmentationRunSpec) -> dict[str, Any]:
    """The spec as it appears in YAML/JSON (camelCase, defaults filled in)."""
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True)
