"""Tasks: how a row becomes a student prompt, how an answer is judged, and what the teacher is asked.

The same student template is used for training and for evaluation (the reference code used two
different ones). Everything here is pure Python so the contract, the jobs and the tests share it.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass

from .spec import TaskSpec

# The official GSM8K answer extractor, minus sign kept (the reference LLM2LLM code dropped it, so -5 == 5).
GSM8K_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")
# Instruct models trained on MATH (Qwen2.5) end with \boxed{N} unless shown '####': taken from the teacher only.
BOXED = re.compile(r"\\boxed\{\s*\$?\s*(-?[0-9.,]+)\s*\}")

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
    "the one the student got wrong, with different surface details, in the same domain and style."
)
TEXT_FORMAT = "Use exactly this format for every example:\n1. Question: <input>\nAnswer: <output>"
GENERIC_TEACHER = (
    "The student got this example wrong.\nInput: {input}\nCorrect output: {output}\n{student_answer}"
    "Please generate {k} similar examples."
)
# teacher.keepLabel: the teacher writes inputs only, for the seed's gold label, which the new rows then carry.
# It is asked to rewrite the failed input (another subject, the same sentence pattern and meaning) rather than
# for "similar" inputs: asked that way, and shown random seed rows of the label as the similar ones, the 1.5B
# teacher wrote plain on-label sentences for 21-22 of 25 negated failures; asked to rewrite, it kept the
# negation in 15 of 25 (JSON replies; bench/results/method_demo.md). Hence no worked example either.
KEEP_LABEL_SYSTEM = (
    "You write new training inputs for a student model. Each new input is a rewrite of the input the student "
    "got wrong: another subject and other details, the same sentence pattern and the same meaning, so that "
    "its correct output is exactly the label given."
)
KEEP_LABEL_TEACHER = (
    "The student got this example wrong.\nInput: {input}\nCorrect output: {output}\n{student_answer}"
    "Rewrite it {k} times as a new input: another subject and other details, the same sentence pattern and "
    "the same meaning, so that its correct output is also {output}."
)
SOLVE_SYSTEM = (
    "Solve the math word problem. Show the calculation step by step, then give the final answer as a single "
    "number without units on the last line, in the form: #### <number>"
)
LABEL_SYSTEM = "Classify the input. Reply with its correct label only, exactly one of: {labels}."
# Reply formats. json: a JSON object that the teacher's engine is constrained to (reply_schema); text: the
# numbered "Question:/Answer:" blocks of parse_teacher_output, for engines that cannot constrain output.
REPLY_FORMATS = ("json", "text")
# The field names of one JSON item, per task kind; the last one is the answer.
JSON_FIELDS = {"gsm8k": ("question", "rationale", "answer"), "classification": ("input", "label"),
               "exact": ("input", "output")}

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


def teacher_answer(text: str) -> str | None:
    """A teacher's final GSM8K answer: after '####', else in the last ``\\boxed{N}``; normalised."""
    found = gsm8k_extract(text)
    if found is not None:
        return found
    boxed = BOXED.findall(text)
    return normalize_number(boxed[-1]) if boxed else None


def with_gsm8k_final(output: str) -> str:
    """A teacher's GSM8K output in the answer key's form: a ``\\boxed{N}`` ending becomes a '#### N' line."""
    if GSM8K_ANSWER.search(output) or not BOXED.search(output):
        return output
    final = teacher_answer(output)
    body = BOXED.sub(lambda m: m.group(1), output).rstrip()
    return f"{body}\n#### {final}" if final is not None else output


def _norm_ws(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class Task:
    spec: TaskSpec
    # Seed rows (input, output) for the teacher's worked example: demonstration_rows(...) of the run's seed.
    examples: tuple[tuple[str, str], ...] = ()
    # teacher.keepLabel: for classification, the teacher writes inputs only and the rows take the seed's label.
    keep_label: bool = False

    @property
    def labels_kept(self) -> bool:
        return self.keep_label and self.spec.kind == "classification"

    @property
    def _fields(self) -> tuple[str, ...]:
        return ("input",) if self.labels_kept else JSON_FIELDS[self.spec.kind]

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
    # The teacher sees a system prompt naming the task (and its labels), one worked example and then the
    # request. The worked example comes from the run's own seed rows (``examples``, see
    # ``demonstration_rows``), never from a fixed domain: small teachers copy the domain and labels of
    # whatever example they are shown. GSM8K keeps its built-in worked problem.
    # With teacher.keepLabel there is none: the request is a rewrite of the failed input (KEEP_LABEL_TEACHER).

    def teacher_system(self, reply_format: str = "text") -> str:
        base = GSM8K_SYSTEM if self.spec.kind == "gsm8k" else KEEP_LABEL_SYSTEM if self.labels_kept else GENERIC_SYSTEM
        if self.spec.kind == "classification" and self.spec.labels:
            base += " The output of every example is exactly one of these labels: " + ", ".join(self.spec.labels) + "."
        if reply_format == "json":
            fields = self._fields
            item = ", ".join(f'"{f}": ...' for f in fields)
            return base.split(" Use exactly this format")[0] + (
                f' Reply with one JSON object: {{"items": [{{{item}}}, ...]}}, one item per new example.')
        return base if self.spec.kind == "gsm8k" else base + " " + TEXT_FORMAT

    @property
    def teacher_template(self) -> str:
        if self.spec.teacher_template:
            return self.spec.teacher_template
        return GSM8K_TEACHER if self.spec.kind == "gsm8k" else KEEP_LABEL_TEACHER if self.labels_kept else GENERIC_TEACHER

    def _request(self, input_text: str, output_text: str, k: int, student_answer: str | None) -> str:
        shown = f"The student answered:\n{student_answer}\n" if student_answer is not None else ""
        return (self.teacher_template.replace("{input}", input_text).replace("{output}", output_text)
                .replace("{k}", str(k)).replace("{student_answer}", shown))

    def _reply(self, items: list[tuple[str, str]], reply_format: str) -> str:
        """A reply in ``reply_format`` holding ``items`` (input, output): what a good teacher answers."""
        if reply_format == "json":
            return json.dumps({"items": [self.json_item(q, a) for q, a in items]}, ensure_ascii=False)
        return "\n".join(f"{n}. Question: {q}\nAnswer: {a}" for n, (q, a) in enumerate(items, 1))

    def json_item(self, question: str, answer: str) -> dict:
        if self.spec.kind == "gsm8k":
            rationale = GSM8K_ANSWER.sub("", answer).strip()
            final = gsm8k_extract(answer)
            return {"question": question, "rationale": rationale, "answer": float(final) if final and "." in final
                    else int(final) if final else 0}
        return dict(zip(self._fields, (question, answer)))

    def _shot(self, reply_format: str) -> tuple[str, str] | None:
        if self.spec.teacher_template:
            return None
        if self.spec.kind == "gsm8k":
            ask, reply = GSM8K_ONE_SHOT.split("\n\n1.")
            q, a = reply.split("\nAnswer: ", 1)
            return ask, self._reply([(q.replace(" Question: ", "", 1).strip(), a)], reply_format)
        if len(self.examples) < 2 or self.labels_kept:  # keepLabel: a rewrite needs no worked example
            return None
        (q, a), similar = self.examples[0], list(self.examples[1:])
        ask = self._request(q, a, len(similar), None)
        return ask, self._reply(similar, reply_format)

    def teacher_messages(self, input_text: str, output_text: str, k: int, student_answer: str | None,
                         reply_format: str = "text") -> list[dict]:
        messages = [{"role": "system", "content": self.teacher_system(reply_format)}]
        shot = self._shot(reply_format)
        if shot is not None:
            messages += [{"role": "user", "content": shot[0]}, {"role": "assistant", "content": shot[1]}]
        messages.append({"role": "user", "content": self._request(input_text, output_text, k, student_answer)})
        return messages

    def reply_schema(self, k: int, max_chars: int) -> dict:
        """The JSON schema a teacher reply for ``k`` new examples must match: exactly k items whose fields
        hold at most ``max_chars`` characters (filters.maxOutputChars) and, for a classification task with
        labels, a label among them. A schema guarantees shape, not truth: the filter still judges each item."""
        text = {"type": "string", "minLength": 1, "maxLength": max_chars}
        fields = self._fields
        props: dict[str, dict] = {f: dict(text) for f in fields}
        if self.spec.kind == "gsm8k":
            props["answer"] = {"type": "number"}
        elif self.spec.kind == "classification" and self.spec.labels:
            props["label"] = {"type": "string", "enum": list(self.spec.labels)}
        item = {"type": "object", "properties": props, "required": list(fields), "additionalProperties": False}
        return {"type": "object", "additionalProperties": False, "required": ["items"],
                "properties": {"items": {"type": "array", "items": item, "minItems": k, "maxItems": k}}}

    def parse_reply(self, text: str, reply_format: str, gold: str | None = None) -> list[tuple[str, str]]:
        """(input, output) pairs of a teacher reply in ``reply_format``; malformed items are skipped. With
        labels kept, every pair's output is ``gold`` (the seed example's label), whatever the teacher wrote."""
        pairs = self._parse_reply(text, reply_format)
        if self.labels_kept:
            if gold is None:
                raise ValueError("teacher.keepLabel needs the seed example's label to parse a reply")
            return [(q, gold) for q, _ in pairs]
        return pairs

    def _parse_reply(self, text: str, reply_format: str) -> list[tuple[str, str]]:
        if reply_format == "text":
            pairs = parse_teacher_output(text)
            if self.spec.kind == "gsm8k":
                return [(q, with_gsm8k_final(a)) for q, a in pairs]
            return pairs
        try:
            doc = json.loads(text)
        except ValueError:
            return []
        items = doc.get("items") if isinstance(doc, dict) else None
        pairs = []
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict):
                continue
            if self.spec.kind == "gsm8k":
                q, rationale, ans = (item.get(f) for f in JSON_FIELDS["gsm8k"])
                number = normalize_number(str(ans)) if isinstance(ans, (int, float, str)) and not isinstance(ans, bool) else None
                if not (isinstance(q, str) and isinstance(rationale, str) and number is not None):
                    continue
                pair = (q.strip(), f"{rationale.strip()}\n#### {number}")
            elif self.labels_kept:
                q = item.get("input")
                if not isinstance(q, str):
                    continue
                pair = (q.strip(), "-")  # the label is the seed's (parse_reply)
            else:
                q, a = (item.get(f) for f in JSON_FIELDS[self.spec.kind])
                if not (isinstance(q, str) and isinstance(a, str)):
                    continue
                pair = (q.strip(), a.strip())
            if pair[0] and pair[1]:
                pairs.append(pair)
        return pairs

    # --- the teacher checking its own answers (filters.verify) --------------------------------

    def solve_messages(self, question: str) -> list[dict]:
        """GSM8K self-consistency: the teacher solves a question it wrote, in a conversation of its own."""
        return [{"role": "system", "content": SOLVE_SYSTEM}, {"role": "user", "content": question}]

    def label_messages(self, input_text: str, reply_format: str) -> list[dict]:
        """Classification relabelling: the teacher labels an input it wrote, shown as the student sees it."""
        system = LABEL_SYSTEM.replace("{labels}", ", ".join(self.spec.labels or []))
        if reply_format == "json":
            system += ' Reply with one JSON object: {"label": ...}.'
        return [{"role": "system", "content": system}, {"role": "user", "content": self.prompt(input_text)}]

    def label_schema(self) -> dict:
        return {"type": "object", "additionalProperties": False, "required": ["label"],
                "properties": {"label": {"type": "string", "enum": list(self.spec.labels or [])}}}

    def parse_label(self, text: str, reply_format: str) -> str | None:
        """The label of a relabelling reply, normalised as ``extract`` does; None when it names none."""
        if reply_format == "json":
            try:
                doc = json.loads(text)
            except ValueError:
                return None
            text = doc.get("label") if isinstance(doc, dict) and isinstance(doc.get("label"), str) else ""
        label = self.extract(text)
        allowed = {_norm_ws(x) for x in self.spec.labels or []}
        return label if label in allowed else None

    def prompt_hash(self, reply_format: str = "text") -> str:
        """Identifies everything fixed that the teacher is sent (system prompt, worked example, request
        template, reply format), for lineage: rows written under another prompt carry another hash."""
        shot = self._shot(reply_format) or ("", "")
        text = "\x1f".join([self.teacher_system(reply_format), *shot, self.teacher_template, reply_format])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def demonstration_rows(spec: TaskSpec, rows: list[tuple[str, str]], seed: int, size: int = 3) -> tuple[tuple[str, str], ...]:
    """Seed rows for the teacher's worked example, drawn reproducibly (``seed``): the first plays the
    example the student got wrong, the others the similar examples a good teacher writes for it. For a
    classification task all share one label (drawn among the labels with enough rows), which shows the
    teacher to keep the label it is given. Empty for gsm8k (built-in worked problem) or too few rows."""
    if spec.kind == "gsm8k" or len(rows) < 2:
        return ()
    rng = random.Random(seed)
    if spec.kind == "classification":
        by_label: dict[str, list[tuple[str, str]]] = {}
        for q, a in rows:
            by_label.setdefault(_norm_ws(a), []).append((q, a))
        groups = [g for _, g in sorted(by_label.items()) if len(g) >= 2]
        if not groups:
            return ()
        rows = rng.choice(groups)
    return tuple(rng.sample(rows, min(size, len(rows))))


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
