"""Judging answers and parsing the teacher: the GSM8K extractor on real data, labels, teacher format."""

from __future__ import annotations

import json
import re

import pytest

from llm2llm.spec import TaskSpec
from llm2llm.tasks import Task, gsm8k_extract, parse_teacher_output
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
