"""The AugmentationRun status: written by the operator into the resource, by the local runner into status.json.

One iteration's figures (``IterationStatus``) are written by the iteration job itself into storage as the
iteration's manifest; the operator and the runner copy them into the status, never compute them.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"]
STAGES = ("prepare", "train", "infer", "score", "teach", "filter", "merge")
CONDITION_TYPES = ("Ready", "Progressing", "Succeeded", "Failed", "Suspended")


def now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(_Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    observed_generation: int | None = None
    last_transition_time: str = Field(default_factory=now)


class TokenCounts(_Model):
    teacher_prompt: int = 0
    teacher_completion: int = 0
    trained: int = Field(0, description="Tokens seen by the student's optimizer (incl. repeats over epochs).")


class IterationStatus(_Model):
    index: int
    attempt: int = 1
    train_rows: int = 0
    train_steps: int = 0
    train_loss: float | None = None
    seed_accuracy: float | None = None
    test_accuracy: float | None = None
    failures: int = 0
    generated: int = 0
    kept: int = 0
    rejected: dict[str, int] = Field(default_factory=dict)
    teacher_reply_format: str | None = Field(
        None, description="json: replies constrained to the task's schema; text: numbered text, parsed."
    )
    seconds: dict[str, float] = Field(default_factory=dict, description="Wall seconds per stage.")
    tokens: TokenCounts = Field(default_factory=TokenCounts)
    gpu_seconds: float = 0.0
    tokens_per_second: float | None = Field(None, description="Training throughput.")
    mfu: float | None = Field(None, description="Model FLOPs utilisation of training (GPU only).")
    datasets: dict[str, str] = Field(default_factory=dict, description="Stage output URIs.")
    job: str | None = Field(None, description="The Ray job (submission id or RayJob name).")
    stop_reason: str | None = Field(None, description="Set when this iteration ends the run.")
    started_at: str | None = None
    finished_at: str | None = None


JobPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Missing"]
# "Suspended": stopped because the run was suspended; it does not use up one of the retry attempts.
TERMINAL = ("Succeeded", "Failed", "Missing", "Suspended")


class JobRecord(_Model):
    """A job the run launched, kept in status because a finished RayJob may delete itself."""

    name: str
    iteration: int
    attempt: int
    state: str = "Pending"
    message: str = ""
    submitted_at: str = Field(default_factory=now)
    finished_at: str | None = None
    releasing: bool | None = Field(
        None, description="Stopped by the run (suspend, deadline) and not yet gone: no new attempt starts until it is."
    )


class ActiveJob(_Model):
    name: str
    iteration: int
    attempt: int
    submitted_at: str = Field(default_factory=now)


class RunStatus(_Model):
    phase: Phase = "Pending"
    observed_generation: int | None = None
    current_iteration: int = 0
    max_iterations: int | None = None
    iteration_label: str | None = Field(None, description="'i/N' for kubectl's Iteration column.")
    stage: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    iterations: list[IterationStatus] = Field(default_factory=list)
    seed_accuracy: float | None = Field(None, description="Latest iteration's seed accuracy.")
    test_accuracy: float | None = Field(None, description="Latest iteration's held-out accuracy.")
    augmented_rows: int = Field(0, description="Teacher rows in the training set so far.")
    active_job: ActiveJob | None = None
    jobs: list[JobRecord] = Field(default_factory=list, description="Every job launched, with its outcome.")
    retry_after: str | None = Field(None, description="Earliest time of the next attempt after a failure.")
    stop_reason: str | None = None
    output: str | None = Field(None, description="The run's storage folder.")
    mlflow_run_url: str | None = None
    started_at: str | None = None
    finished_at: str | None = None

    def wire(self) -> dict:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def set_condition(
        self, type_: str, status: bool, reason: str, message: str = "", generation: int | None = None
    ) -> None:
        """Set a condition; the transition time only moves when the status flips (API conventions)."""
        value = "True" if status else "False"
        old = self.condition(type_)
        if old is not None and old.status == value:
            old.reason, old.message, old.observed_generation = reason, message, generation
            return
        self.conditions = [c for c in self.conditions if c.type != type_]
        self.conditions.append(
            Condition(type=type_, status=value, reason=reason, message=message, observed_generation=generation)
        )

    def record_iteration(self, it: IterationStatus) -> None:
        """Insert or replace one iteration's figures (idempotent: keyed by index)."""
        self.iterations = sorted([i for i in self.iterations if i.index != it.index] + [it], key=lambda i: i.index)
        last = self.iterations[-1]
        self.seed_accuracy = last.seed_accuracy
        self.test_accuracy = last.test_accuracy
        # Kept rows are merged into the next iteration's training set; the last one teaches nothing.
        self.augmented_rows = sum(i.kept for i in self.iterations)
