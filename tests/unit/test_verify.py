"""filters.verify: the safe arithmetic parser, the rationale check, and the teacher-side checks as the filter
judges them (self-consistency, relabelling), plus label-kept generation and \\boxed{} replies."""

from __future__ import annotations

import json
import threading
import time
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llm2llm.schemas import GENERATED, REJECT_REASONS, table
from llm2llm.spec import FiltersSpec, TaskSpec, VerifySpec
from llm2llm.tasks import Task, gsm8k_extract, teacher_answer, with_gsm8k_final
from llm2llm_jobs import verify
from llm2llm_jobs.filter import CandidateFilter, candidates_from_completion, filter_candidates
from llm2llm_jobs.verify import ArithmeticError_, check_rationale, safe_eval, steps
from tests.conftest import GSM8K

# --- the parser ------------------------------------------------------------------------------------


@pytest.mark.parametrize("expr, value", [
    ("3 * 4", 12), ("12 - 2", 10), ("48/2", 24), ("(3 + 4) * 2", 14), ("2**10", 1024), ("-5 + 3", -2),
    ("0.1 + 0.2", Fraction(3, 10)), ("10 / 4", Fraction(5, 2)), ("2 ** -2", Fraction(1, 4)), ("+7", 7),
])
def test_safe_eval_computes_exactly(expr, value):
    assert safe_eval(expr) == value


@pytest.mark.parametrize("expr", [
    "9 ** 99999999",                      # a huge exponent: refused before computing
    "10 ** 10 ** 10",
    "2 ** 0.5",                           # a non-integer exponent
    "(" * 200 + "1" + ")" * 200,          # nesting past the bound (ast.parse would recurse)
    "1" + " + 1" * 100,                   # more nodes than allowed
    "9" * 30,                             # a number past the magnitude bound
    "1 / 0", "0 ** -1",                   # division by zero
    "__import__('os').system('true')",    # not arithmetic: never run
    "x + 1", "'a' * 3", "True + 1", "[1, 2]", "3 // 2", "3 % 2", "1 if 1 else 2", "(1).real", "1j * 2",
    "", "1 +", "3 4",
])
def test_safe_eval_refuses_what_is_not_bounded_arithmetic(expr):
    start = time.perf_counter()
    with pytest.raises(ArithmeticError_):
        safe_eval(expr)
    assert time.perf_counter() - start < 0.5


def test_hostile_rationales_are_rejected_quickly():
    for text in ["2 ** 999999 = 1", "(" * 5000 + "1" + ")" * 5000 + " + 1 = 2", "9" * 5000 + " = 9",
                 " ".join(["1 + 1 = 2."] * 500)]:
        start = time.perf_counter()
        assert check_rationale(text, "2") == verify.ARITHMETIC
        assert time.perf_counter() - start < 1.0


# --- steps of a rationale -----------------------------------------------------------------------------


def test_steps_read_inline_equations_chains_and_calculator_annotations():
    assert steps("Tom has 3 * 4 = 12 apples. After eating 2 he has 12 - 2 = 10.") == [("3 * 4", "12"), ("12 - 2", "10")]
    assert steps("3 * 4 = 12 - 2 = 10") == [("3 * 4", "12"), ("12 - 2", "10")]
    assert steps("Natalia sold <<48/2=24>>24 clips") == [("48/2", "24")]
    assert steps("$1,200 + $300 = $1,500 and 5 x 2 = 10 and 2^3 = 8") == [
        ("1200 + 300", "1500"), ("5 * 2", "10"), ("2**3", "8")]
    assert steps("On day 2 3 + 4 = 7 pens") == [("3 + 4", "7")]  # the expression is what parses before '='


def test_latex_steps_are_read_as_instruct_models_write_them():
    # Qwen2.5's own replies (bench/results/teacher_dtype.json): \\( \\), \\[ \\], \\times, \\frac, {,} thousands.
    assert steps("the total amount she makes is \\(9 \\times 2 = 18\\).") == [("9  *  2", "18")]
    assert steps("\\[ 80{,}000 \\times 1.50 = 120,000 \\]") == [("80000  *  1.50", "120000")]
    assert check_rationale("\\frac{12}{4} = 3 and \\dfrac{1}{2} \\cdot 10 = 5 \\\\ \\$5 \\div 2 = 2.5", "2.5") is None
    assert check_rationale("\\text{Total} = 2 + 1 = 4", "4") == verify.ARITHMETIC


def test_prose_units_and_fractions_are_no_steps():
    for text in ["She has 5 apples.", "20% of 50 = 10", "Total = 7", "10 apples - 4 = 6",
                 "1/2 * 1/2 = 1/4", "100/5 = 5A/5 so A = 20"]:
        assert steps(text) == [], text


def test_check_rationale_verdicts():
    assert check_rationale("Tom has 3 * 4 = 12 apples. He eats 2: 12 - 2 = 10.", "10") is None
    assert check_rationale("3 * 4 = 13", "13") == verify.ARITHMETIC
    assert check_rationale("3 * 4 = 12 - 2 = 9", "9") == verify.ARITHMETIC
    assert check_rationale("3 * 4 = 12", "11") == verify.FINAL
    assert check_rationale("10 / 3 = 3.33 each", "3.33") is None  # rounded to the decimals shown
    assert check_rationale("10 / 3 = 3.5 each", "3.5") == verify.ARITHMETIC
    assert check_rationale("7 / 2 = 3", "3") == verify.ARITHMETIC  # no rounding to whole numbers
    assert check_rationale("She has 5 apples.", "5") is None  # nothing to recompute


def test_gold_gsm8k_rationales_mostly_pass():
    """The answer key itself: its steps are right but for a few typos, so a check that rejected many would be
    rejecting good teacher rows too. Measured: 97.3% of the 7,473 train rationales pass."""
    rows = [json.loads(line) for line in (GSM8K / "train.jsonl").read_text().splitlines()]
    passed = sum(check_rationale(r["answer"].split("####")[0], gsm8k_extract(r["answer"])) is None for r in rows)
    assert passed / len(rows) > 0.96
    # And one of its known typos is caught: "So it cost 192*100=$1920".
    typo = next(r for r in rows if "192*100=$1920" in r["answer"])
    assert check_rationale(typo["answer"].split("####")[0], gsm8k_extract(typo["answer"])) == verify.ARITHMETIC


# --- the filter with filters.verify --------------------------------------------------------------------

GSM = Task(TaskSpec(kind="gsm8k"))
SENT = Task(TaskSpec(kind="classification", labels=["positive", "negative"]), keep_label=True)


def _gsm_filter(**verify_kw) -> CandidateFilter:
    return CandidateFilter(GSM, FiltersSpec(verify=VerifySpec(**verify_kw)), 4, existing=[])


def _rows(text: str, checks: list[dict | None] | None = None, parent: str = "p1") -> list[dict]:
    rows = candidates_from_completion(text, parent, 0, "t", "h", 0, 10, 20)
    for r, c in zip(rows, checks or []):
        r["checks"] = verify.dump_checks(c)
    return rows


WRONG_STEP = "1. Question: Mia buys 5 packs of 6 pens. How many pens?\nAnswer: 5 * 6 = 35\n#### 35"
WRONG_FINAL = "1. Question: Leo runs 4 km a day for 6 days. How far?\nAnswer: 4 * 6 = 24 km\n#### 25"
RIGHT = "1. Question: A farm has 7 cows and 9 pigs. How many animals?\nAnswer: 7 + 9 = 16\n#### 16"


def test_arithmetic_rejections_are_counted_by_reason_and_can_be_turned_off():
    rows = _rows(WRONG_STEP) + _rows(WRONG_FINAL) + _rows(RIGHT)
    kept, rejected, reasons = filter_candidates(_gsm_filter(), table(rows, GENERATED), "t", "h", 0)
    assert reasons == {"verify_arithmetic": 1, "verify_final": 1}
    assert kept.column("output").to_pylist() == ["7 + 9 = 16\n#### 16"]
    assert set(reasons) <= set(REJECT_REASONS)
    kept, _, reasons = filter_candidates(_gsm_filter(arithmetic=False), table(rows, GENERATED), "t", "h", 0)
    assert kept.num_rows == 3 and reasons == {}


def test_self_consistency_keeps_a_row_only_when_most_solutions_agree():
    texts = [RIGHT, RIGHT.replace("7 cows", "8 cows").replace("7 + 9 = 16", "8 + 9 = 17").replace("#### 16", "#### 17"),
             RIGHT.replace("7 cows", "6 cows").replace("7 + 9 = 16", "6 + 9 = 15").replace("#### 16", "#### 15"), RIGHT]
    checks = [{"solutions": ["16", "16", "15"]},   # 2 of 3 agree: kept
              {"solutions": ["17", None, "16"]},   # 1 of 3 (an unparseable solution counts against): rejected
              None,                                # the check was not made: rejected, not kept unverified
              {"solutions": ["16", "16", "16"]}]   # the same question again: a duplicate, whatever the check says
    rows = [r for t, c in zip(texts, checks) for r in _rows(t, [c])]
    kept, _, reasons = filter_candidates(_gsm_filter(self_consistency=3), table(rows, GENERATED), "t", "h", 0)
    assert kept.num_rows == 1 and kept.column("output").to_pylist() == ["7 + 9 = 16\n#### 16"]
    assert reasons == {"verify_consistency": 1, "verify_missing": 1, "duplicate": 1}


def test_relabelling_keeps_a_row_only_when_the_teacher_agrees_with_its_label():
    flt = CandidateFilter(SENT, FiltersSpec(verify=VerifySpec(relabel=True)), 4, existing=[])
    reply = json.dumps({"items": [{"input": "The battery died in a day."}, {"input": "Works great, love it."},
                                  {"input": "Arrived broken."}]})
    rows = candidates_from_completion(reply, "p1", 0, "t", "h", 0, 10, 20,
                                      parse=lambda text: SENT.parse_reply(text, "json", gold="negative"))
    for r, label in zip(rows, ["negative", "positive", None]):
        r["checks"] = verify.dump_checks({"label": label})
    kept, rejected, reasons = filter_candidates(flt, table(rows, GENERATED), "t", "h", 0)
    assert kept.to_pylist()[0]["input"] == "The battery died in a day." and kept.num_rows == 1
    assert reasons == {"verify_label": 2}


# --- label-kept generation and the teacher's final-answer formats ----------------------------------------


def test_kept_labels_come_from_the_seed_not_from_the_teachers_text():
    # The text format still carries the teacher's label: it is ignored.
    text = "1. Question: The screen cracked in a week.\nAnswer: positive"
    assert SENT.parse_reply(text, "text", gold="negative") == [("The screen cracked in a week.", "negative")]
    schema = SENT.reply_schema(2, 100)
    assert schema["properties"]["items"]["items"]["required"] == ["input"]  # the teacher writes no label
    msgs = SENT.teacher_messages("It broke.", "negative", 2, None, "json")
    assert "Rewrite it 2 times" in msgs[-1]["content"] and "correct output is also negative" in msgs[-1]["content"]
    assert '"input"' in msgs[0]["content"] and '"label"' not in msgs[0]["content"]
    # A rewrite of the failed input, with no worked example: seed rows of the same label shown as "similar"
    # taught the teacher to write any on-label sentence (bench/results/method_demo.md).
    shown = Task(SENT.spec, (("Great.", "positive"), ("Lovely.", "positive")), keep_label=True)
    assert [m["role"] for m in shown.teacher_messages("It broke.", "negative", 1, None, "json")] == ["system", "user"]
    off = Task(SENT.spec, keep_label=False)
    assert off.parse_reply(text, "text") == [("The screen cracked in a week.", "positive")]
    assert off.prompt_hash("json") != SENT.prompt_hash("json")
    with pytest.raises(ValueError, match="keepLabel"):
        SENT.parse_reply(text, "text")


def test_boxed_answers_are_taken_from_the_teacher():
    assert teacher_answer("so the total is \\boxed{1,234}.") == "1234"
    assert teacher_answer("3 * 4 = 12\n#### 12 (not \\boxed{5})") == "12"  # '####' first
    assert teacher_answer("no answer") is None
    fixed = with_gsm8k_final("Mia has 5 * 6 = 30 pens, so \\boxed{30}")
    assert fixed == "Mia has 5 * 6 = 30 pens, so 30\n#### 30" and gsm8k_extract(fixed) == "30"
    reply = "1. Question: Mia buys 5 packs of 6 pens. How many pens?\nAnswer: 5 * 6 = 30. The answer is \\boxed{30}."
    assert GSM.parse_reply(reply, "text") == [("Mia buys 5 packs of 6 pens. How many pens?",
                                               "5 * 6 = 30. The answer is 30.\n#### 30")]
    # The student's score keeps the official extractor: \boxed{} is no answer there.
    assert GSM.extract("\\boxed{30}") is None


# --- the teach stage makes the teacher-side checks: a real OpenAI-compatible server on 127.0.0.1 ----------

class _Teacher(BaseHTTPRequestHandler):
    """Answers like a teacher: new examples for a teach request, a solution for a solve request, a label for
    a labelling request; every request is recorded."""

    seen: list[dict] = []
    replies: dict[str, str] = {}

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        kind = "solve" if system.startswith("Solve") else "label" if system.startswith("Classify") else "teach"
        type(self).seen.append({"kind": kind, "user": user})
        content = self.replies[kind] if kind == "teach" else self.replies.get(user, "?")
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                 "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
                 "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def teacher_server():
    _Teacher.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Teacher)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def _teach(endpoint: str, task: dict, failure: dict, **spec_kw) -> dict:
    pytest.importorskip("openai")
    from llm2llm.spec import parse_spec
    from llm2llm_jobs.fanout import teach_shard

    spec = parse_spec({"task": task, "data": {"seed": "/s"}, "output": "/o", **spec_kw, "teacher": {
        "kind": "openai", "endpoint": endpoint, "model": "m", "structuredOutput": False, "maxRounds": 1,
        "samplesPerFailure": 2, **spec_kw.pop("teacher", {})}})
    return teach_shard(spec=spec.model_dump(mode="json", by_alias=True), model_path=None, failures=[failure],
                       existing=[], held_out=[], iteration=0, shard=0, token_budget=None, api_key_env="NO_KEY_HERE")


def test_teach_stage_asks_the_teacher_to_solve_only_the_candidates_that_pass_the_other_checks(teacher_server):
    right_q = "A farm has 7 cows and 9 pigs. How many animals?"
    _Teacher.replies = {"teach": WRONG_STEP + "\n2. Question: " + right_q + "\nAnswer: 7 + 9 = 16\n#### 16",
                        right_q: "7 + 9 = 16 animals.\n#### 16"}
    res = _teach(teacher_server, {"kind": "gsm8k"}, {"id": "f1", "input": "Q?", "output": "#### 1", "prediction": ""},
                 filters={"verify": {"selfConsistency": 3}})
    solves = [s for s in _Teacher.seen if s["kind"] == "solve"]
    assert [s["user"] for s in solves] == [right_q] * 3  # the wrong-arithmetic candidate cost no solve calls
    by_q = {r["input"]: r for r in res["rows"]}
    assert json.loads(by_q[right_q]["checks"]) == {"solutions": ["16", "16", "16"]}
    assert by_q["Mia buys 5 packs of 6 pens. How many pens?"]["checks"] is None
    # Every call's tokens are counted, and the rows' sums are the shard's.
    assert res["prompt_tokens"] == 5 * 4 == sum(r["prompt_tokens"] for r in res["rows"])
    assert res["completion_tokens"] == 7 * 4 == sum(r["completion_tokens"] for r in res["rows"])
    flt = CandidateFilter(GSM, FiltersSpec(verify=VerifySpec(self_consistency=3)), 2, existing=[])
    kept, _, reasons = filter_candidates(flt, table(res["rows"], GENERATED), "m", "h", 0)
    assert kept.column("input").to_pylist() == [right_q] and reasons == {"verify_arithmetic": 1}


def test_teach_stage_relabels_and_the_seed_label_is_kept(teacher_server):
    task = {"kind": "classification", "labels": ["positive", "negative"], "studentTemplate": "Review: {input}\nSentiment:"}
    _Teacher.replies = {"teach": "1. Question: The strap broke on day one.\nAnswer: positive\n"
                                 "2. Question: Best purchase this year.\nAnswer: negative",
                        "Review: The strap broke on day one.\nSentiment:": "negative",
                        "Review: Best purchase this year.\nSentiment:": "positive"}
    res = _teach(teacher_server, task, {"id": "f1", "input": "It stopped working.", "output": "negative",
                                        "prediction": "positive"}, filters={"verify": {"relabel": True}},
                 teacher={"keepLabel": True})
    rows = {r["input"]: r for r in res["rows"]}
    assert {q: r["output"] for q, r in rows.items()} == {"The strap broke on day one.": "negative",
                                                          "Best purchase this year.": "negative"}  # the seed's label
    assert json.loads(rows["Best purchase this year."]["checks"]) == {"label": "positive"}
    flt = CandidateFilter(Task(TaskSpec(**task)), FiltersSpec(verify=VerifySpec(relabel=True)), 2, existing=[])
    kept, _, reasons = filter_candidates(flt, table(res["rows"], GENERATED), "m", "h", 0)
    assert kept.column("input").to_pylist() == ["The strap broke on day one."] and reasons == {"verify_label": 1}
