"""Tasks: how a row becomes a student prompt, how an answer is judged, and what the teacher is asked.

The same student template is used for training and for evaluation (the reference code used two
different ones). Everything here is pure Python so the contract, the jobs and the tests share it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .spec import TaskSpec

# The official GSM8K answer extractor, minus sign kept (the reference LLM2LLM code dropped it, so -5 == 5).
GSM8K_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")

GSM8K_STUDENT = "Question: {input}\nAnswer:"
CLASSIFICATION_STUDENT = "{input}\nLabel:"
EXACT_STUDENT = "{input}\nAnswer:"

GSM8K_SYSTEM = (
    "You are an educational AI. You take math word problems that a student got wrong and write new "
    "practice problems that exercise the same skills. Rules: write in English; keep problems short; the "
    "final answer is a single number without units; show the calculation step by step; make no "
    "mistakes; change the names and numbers instead of copying the original problem. Use exactly this "
    "format for every problem:\n1. Question: <problem>\nAnswer: <step-by-step rationale>\n#### <number>"
)
GSM8K_ONE_SHOT = (
    "The student was given the following question:\nTom has 3 boxes with 4 apples each. He eats 2 apples. "
    "How many apples are left?\nThe answer key has this as the rationale and answer:\nTom has 3 * 4 = 12 "
    "apples. After eating 2 he has 12 - 2 = 10.\n#### 10\nPlease generate 1 similar questions, along with "
    "the correct calculations and rationale.\n\n1. Question: Mia buys 5 packs of 6 pencils and gives 7 away. "
    "How many pencils does she keep?\nAnswer: Mia buys 5 * 6 = 30 pencils. She keeps 30 - 7 = 23.\n#### 23"
)
GSM8K_TEACHER = (
    "The student was given the following question:\n{input}\nThe answer key has this as the rationale and "
    "answer:\n{output}\n{student_answer}Please generate {k} similar questions, along with the correct "
    "calculations and rationale."
)
GENERIC_SYSTEM = (
    "You write new training examples for a student model. Each new example must test the same skill as "
    "the one the student got wrong, with different surface details. Use exactly this format for every "
    "example:\n1. Question: <input>\nAnswer: <output>"
)
# A worked example of the reply format for the generic teacher. Small teachers follow a demonstration
# far better than a format description (SmolLM2-135M produced no parseable item without it).
GENERIC_ONE_SHOT = (
    "The student got this example wrong.\nInput: The soup arrived cold and tasted of nothing.\nCorrect output: "
    "negative\nPlease generate 2 similar examples.",
    "1. Question: The bread was stale and the butter had gone sour.\nAnswer: negative\n"
    "2. Question: Our waiter forgot the order twice and never apologised.\nAnswer: negative",
)
GENERIC_TEACHER = (
    "The student got this example wrong.\nInput: {input}\nCorrect output: {output}\n{student_answer}"
    "Please generate {k} similar examples."
)


def normalize_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5'; returns None when it is not a number."""
    t = text.replace(",", "").strip().rstrip(".")
    try:
        value = float(t)
    except ValueError:
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return None
    return f"{value:.10g}" if value != int(value) else str(int(value))


def gsm8k_extract(text: str) -> str | None:
    """The number after the first '####', normalised; None when absent."""
    m = GSM8K_ANSWER.search(text)
    return normalize_number(m.group(1)) if m else None


def _norm_ws(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class Task:
    spec: TaskSpec

    @property
    def student_template(self) -> str:
        if self.spec.student_template:
            return self.spec.student_template
        return {"gsm8k": GSM8K_STUDENT, "classification": CLASSIFICATION_STUDENT}.get(self.spec.kind, EXACT_STUDENT)

    def prompt(self, input_text: str) -> str:
        # str.replace, not str.format: user inputs contain braces.
        return self.student_template.replace("{input}", input_text)

    def target(self, output_text: str) -> str:
        """The training target that follows the prompt (loss is computed on this part only)."""
        return " " + output_text.strip()

    def extract(self, text: str) -> str | None:
        """The answer a generation commits to, normalised for comparison; None when unparseable."""
        if self.spec.kind == "gsm8k":
            return gsm8k_extract(text)
        first = text.strip().split("\n", 1)[0].strip() if self.spec.kind == "classification" else text
        value = _norm_ws(first)
        return value or None

    def is_correct(self, prediction: str, gold: str) -> bool:
        got, want = self.extract(prediction), self.extract(gold)
        return got is not None and got == want

    def valid_output(self, output_text: str) -> bool:
        """Whether a teacher-written output has the task's answer format."""
        answer = self.extract(output_text)
        if answer is None:
            return False
        if self.spec.kind == "classification" and self.spec.labels:
            return answer in {_norm_ws(label) for label in self.spec.labels}
        return True

    # --- teacher -----------------------------------------------------------------------------
    @property
    def teacher_system(self) -> str:
        return GSM8K_SYSTEM if self.spec.kind == "gsm8k" else GENERIC_SYSTEM

    @property
    def teacher_template(self) -> str:
        if self.spec.teacher_template:
            return self.spec.teacher_template
        return GSM8K_TEACHER if self.spec.kind == "gsm8k" else GENERIC_TEACHER

    def teacher_messages(self, input_text: str, output_text: str, k: int, student_answer: str | None) -> list[dict]:
        shown = f"The student answered:\n{student_answer}\n" if student_answer is not None else ""
        user = (
            self.teacher_template.replace("{input}", input_text)
            .replace("{output}", output_text)
            .replace("{k}", str(k))
            .replace("{student_answer}", shown)
        )
        messages = [{"role": "system", "content": self.teacher_system}]
        if not self.spec.teacher_template:
            if self.spec.kind == "gsm8k":
                shot = (GSM8K_ONE_SHOT.split("\n\n1.")[0], "1." + GSM8K_ONE_SHOT.split("\n\n1.")[1])
            else:
                shot = GENERIC_ONE_SHOT
            messages.append({"role": "user", "content": shot[0]})
            messages.append({"role": "assistant", "content": shot[1]})
        messages.append({"role": "user", "content": user})
        return messages

    def prompt_hash(self) -> str:
        """Identifies the teacher prompt version (system, one-shot, template), for lineage."""
        shot = "" if self.spec.teacher_template else (GSM8K_ONE_SHOT if self.spec.kind == "gsm8k" else "".join(GENERIC_ONE_SHOT))
        text = self.teacher_system + "\x1f" + shot + "\x1f" + self.teacher_template
        return hashlib.sha256(text.encode()).hexdigest()[:16]


_ITEM = re.compile(r"(?:^|\n)\s*\d+[.)]\s*Question:\s*", re.IGNORECASE)
_ANSWER = re.compile(r"\n\s*Answer:\s*", re.IGNORECASE)


def parse_teacher_output(text: str) -> list[tuple[str, str]]:
    """Split '1. Question: ... Answer: ...' blocks into (question, answer) pairs. Junk before the first
    numbered item is dropped; a block without an 'Answer:' is skipped."""
    parts = _ITEM.split("\n" + text)
    pairs = []
    for block in parts[1:]:
        qa = _ANSWER.split(block, maxsplit=1)
        if len(qa) != 2:
            continue
        question, answer = qa[0].strip(), qa[1].strip()
        if question and answer:
            pairs.append((question, answer))
    return pairs
