"""Judging answers and parsing the teacher: the GSM8K extractor on real data, labels, teacher format."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from llm2llm.spec import TaskSpec
from llm2llm.tasks import JSON_FIELDS, Task, demonstration_rows, gsm8k_extract, parse_teacher_output
from tests.conftest import GSM8K

GSM = Task(TaskSpec(kind="gsm8k"))


def test_gsm8k_extractor_parses_every_train_answer():
    rows = [json.loads(line) for line in (GSM8K / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 7473
    for row in rows:
        # The official reference: the text after '#### ', commas removed.
        want = row["answer"].split("#### ")[-1].strip().replace(",", "")
        got = gsm8k_extract(row["answer"])
        assert got is not None, row["answer"]
        assert float(got) == float(want), (got, want)
    negatives = [r for r in rows if re.search(r"#### -", r["answer"])]
    assert all(gsm8k_extract(r["answer"]).startswith("-") for r in negatives)


def test_gsm8k_sign_and_format_matter():
    assert GSM.is_correct("so #### -5", "#### -5")
    assert not GSM.is_correct("so #### 5", "#### -5")  # the reference code's bug: it strips the sign
    assert GSM.is_correct("#### 1,234", "#### 1234.0")
    assert not GSM.is_correct("the answer is 5", "#### 5")  # no '####': unparseable, so wrong


def test_classification_takes_the_first_line_and_checks_labels():
    t = Task(TaskSpec(kind="classification", labels=["positive", "negative"]))
    assert t.is_correct(" positive\nReview: next one", "positive")
    assert not t.is_correct(" negative", "positive")
    assert t.valid_output("negative") and not t.valid_output("meh")


def test_student_prompt_is_the_same_for_training_and_eval_and_keeps_braces():
    t = Task(TaskSpec(kind="exact", student_template="Q: {input}\nA:"))
    assert t.prompt("what is {x}?") == "Q: what is {x}?\nA:"


def test_teacher_messages_show_the_student_answer_only_when_asked():
    msgs = GSM.teacher_messages("Q?", "A\n#### 3", 2, None)
    assert msgs[0]["role"] == "system" and "Please generate 2 similar questions" in msgs[-1]["content"]
    assert "student answered" not in msgs[-1]["content"]
    assert "student answered:\n#### 7" in GSM.teacher_messages("Q?", "A", 1, "#### 7")[-1]["content"]


def test_parse_teacher_output_drops_junk_and_incomplete_items():
    text = ("Sure! Here you go:\n1. Question: A has 2 apples. How many?\nAnswer: 2\n#### 2\n"
            "2) Question: missing its answer\n3. Question: B has 3.\nAnswer: 3 * 1 = 3\n#### 3")
    assert parse_teacher_output(text) == [("A has 2 apples. How many?", "2\n#### 2"), ("B has 3.", "3 * 1 = 3\n#### 3")]
    assert parse_teacher_output("I cannot help with that.") == []


@pytest.mark.parametrize("prompt_hash_changes", [True])
def test_prompt_hash_tracks_the_teacher_prompt(prompt_hash_changes):
    custom = Task(TaskSpec(kind="gsm8k", teacher_template="Make {k} like {input}"))
    assert (GSM.prompt_hash() != custom.prompt_hash()) is prompt_hash_changes


# --- teacher prompts from the user's task, and replies constrained to a schema -------------------

TICKETS = TaskSpec(kind="classification", labels=["billing", "technical", "account"])
TICKET_ROWS = [("I was charged twice this month.", "billing"), ("The app crashes on start.", "technical"),
               ("Please close my account.", "account"), ("Where is my invoice?", "billing"),
               ("Login page shows error 500.", "technical"), ("Refund the extra charge.", "billing")]


def test_worked_example_comes_from_the_runs_seed_rows_and_keeps_one_label():
    shot = demonstration_rows(TICKETS, TICKET_ROWS, seed=1)
    assert len(shot) >= 2 and set(shot) <= set(TICKET_ROWS)
    assert len({label for _, label in shot}) == 1  # the reply keeps the label of the example it was given
    assert shot == demonstration_rows(TICKETS, TICKET_ROWS, seed=1)  # the same for every shard and iteration
    task = Task(TICKETS, shot)
    for fmt in ("json", "text"):
        msgs = task.teacher_messages("My card was declined.", "billing", 2, None, fmt)
        text = "\n".join(m["content"] for m in msgs)
        assert "billing, technical, account" in msgs[0]["content"]  # the system prompt names the labels
        assert shot[0][0] in msgs[1]["content"] and all(q in msgs[2]["content"] for q, _ in shot[1:])
        assert "soup" not in text and "positive" not in text  # nothing of a fixed (sentiment) domain
    # The request template overrides everything, worked example included.
    custom = Task(TaskSpec(kind="classification", labels=["a", "b"], teacher_template="Write {k} like {input}"),
                  shot)
    assert [m["role"] for m in custom.teacher_messages("x", "a", 1, None, "json")] == ["system", "user"]


def test_too_few_seed_rows_or_gsm8k_use_no_seed_demonstration():
    assert demonstration_rows(TICKETS, TICKET_ROWS[:1], seed=0) == ()
    assert demonstration_rows(TICKETS, [("a", "billing"), ("b", "account")], seed=0) == ()  # no label twice
    assert demonstration_rows(TaskSpec(kind="gsm8k"), TICKET_ROWS, seed=0) == ()
    assert len(demonstration_rows(TaskSpec(kind="exact"), TICKET_ROWS, seed=0)) == 3
    # Without a worked example, only the system prompt and the request are sent.
    assert len(Task(TICKETS).teacher_messages("x", "billing", 1, None, "json")) == 2


@pytest.mark.parametrize("kind", ["classification", "exact", "gsm8k"])
def test_reply_schema_accepts_the_worked_example_and_refuses_what_the_filter_would(kind):
    spec = {"classification": TICKETS, "exact": TaskSpec(kind="exact"), "gsm8k": TaskSpec(kind="gsm8k")}[kind]
    task = Task(spec, demonstration_rows(spec, TICKET_ROWS, seed=2))
    msgs = task.teacher_messages("Q?", "billing" if kind != "gsm8k" else "1 + 1 = 2\n#### 2", 2, None, "json")
    shot = json.loads(msgs[2]["content"])
    jsonschema.validate(shot, task.reply_schema(len(shot["items"]), 4000))
    schema = task.reply_schema(2, 50)
    with pytest.raises(jsonschema.ValidationError):  # one item where two were asked for
        jsonschema.validate({"items": shot["items"][:1]}, schema)
    fields = JSON_FIELDS[kind]
    long = {f: "x" * 51 for f in fields} | ({"answer": 3} if kind == "gsm8k" else {})
    with pytest.raises(jsonschema.ValidationError):  # longer than filters.maxOutputChars
        jsonschema.validate({"items": [long, long]}, schema)
    if kind == "classification":
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"items": [{"input": "a", "label": "sales"}] * 2}, schema)
    if kind == "gsm8k":
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"items": [{"question": "q", "rationale": "r", "answer": "six"}] * 2}, schema)


def test_json_replies_parse_into_the_tasks_pairs_and_skip_malformed_items():
    gsm = GSM.parse_reply('{"items": [{"question": "Q1?", "rationale": "2 * 3 = 6", "answer": 6.0},'
                          ' {"question": "Q2?", "rationale": "r", "answer": "x"}, {"question": "Q3?"}]}', "json")
    assert gsm == [("Q1?", "2 * 3 = 6\n#### 6")] and GSM.is_correct(gsm[0][1], "#### 6")
    tickets = Task(TICKETS)
    assert tickets.parse_reply('{"items": [{"input": " Card declined ", "label": "billing"}, 5, {"input": 3}]}',
                               "json") == [("Card declined", "billing")]
    for broken in ('{"items": [{"input": "cut off', "[]", '{"items": "no"}', ""):
        assert tickets.parse_reply(broken, "json") == []
    assert tickets.parse_reply("1. Question: Card declined\nAnswer: billing", "text") == [("Card declined", "billing")]


def test_prompt_hash_covers_the_worked_example_and_the_reply_format():
    a = Task(TICKETS, demonstration_rows(TICKETS, TICKET_ROWS, seed=1))
    b = Task(TICKETS, demonstration_rows(TICKETS, TICKET_ROWS[::-1], seed=5))
    assert a.examples != b.examples
    assert len({a.prompt_hash("json"), a.prompt_hash("text"), b.prompt_hash("json")}) == 3
