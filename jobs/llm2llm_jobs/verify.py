"""Checks of a teacher's answers before they become training data (``filters.verify``).

GSM8K rationales: every ``a op b = c`` step (and GSM8K's ``<<a*b=c>>`` calculator annotations) is recomputed
with a small arithmetic parser, an ``ast`` walk over numbers and ``+ - * / **`` and parentheses with bounded
sizes (never ``eval``), and the final answer must equal the last step's result. The teacher-side checks
(self-consistency, relabelling) need model calls: the teach stage makes them and records what the teacher
answered in the candidate's ``checks``; ``check_candidate`` turns that record into a verdict, so the filter
stage stays deterministic and needs no teacher.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from fractions import Fraction

# Bounds that keep one check cheap whatever the teacher writes.
MAX_EXPR_CHARS = 200
MAX_NODES = 64
MAX_PAREN_DEPTH = 16
MAX_MAGNITUDE = Fraction(10) ** 15
MAX_DENOMINATOR = 10**12
MAX_EXPONENT = 64
MAX_STEPS = 64
# (Percentages are no step: "20% = 4" is prose, and "(20/100)" would make it a false error.)

# Reject reasons (llm2llm.schemas.REJECT_REASONS lists them with the others).
ARITHMETIC = "verify_arithmetic"
FINAL = "verify_final"
CONSISTENCY = "verify_consistency"
LABEL = "verify_label"
UNVERIFIED = "verify_missing"


class ArithmeticError_(ValueError):
    """An expression outside what the parser takes (not arithmetic, too large, too deep, division by zero)."""


_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


def _bounded(value: Fraction) -> Fraction:
    if abs(value) > MAX_MAGNITUDE or value.denominator > MAX_DENOMINATOR:
        raise ArithmeticError_("intermediate result too large")
    return value


def _pow(base: Fraction, exp: Fraction) -> Fraction:
    if exp.denominator != 1 or abs(exp) > MAX_EXPONENT:
        raise ArithmeticError_("only small integer exponents are taken")
    if base == 0 and exp < 0:
        raise ArithmeticError_("division by zero")
    e = int(exp)
    # Refuse before computing: |base| ** e past the bound (or its reciprocal's denominator) would be large.
    if abs(base) > 1 and abs(e) * len(str(abs(base.numerator))) > 17:
        raise ArithmeticError_("power too large")
    if base != 0 and abs(e) * len(str(base.denominator)) > 13:
        raise ArithmeticError_("power too large")
    return _bounded(base**e)


def _depth(expr: str) -> int:
    depth = deepest = 0
    for ch in expr:
        depth += (ch == "(") - (ch == ")")
        deepest = max(deepest, depth)
    return deepest


def safe_eval(expr: str) -> Fraction:
    """The exact value of an arithmetic expression: numbers (ints, decimals), + - * / ** and parentheses.
    Anything else, or a size past the bounds, raises ``ArithmeticError_``; never runs code."""
    if len(expr) > MAX_EXPR_CHARS:
        raise ArithmeticError_("expression too long")
    if _depth(expr) > MAX_PAREN_DEPTH:  # ast.parse itself recurses on nesting: bound it before parsing
        raise ArithmeticError_("nested too deep")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise ArithmeticError_(f"not an arithmetic expression: {type(err).__name__}") from None
    nodes = 0

    def walk(node: ast.AST) -> Fraction:
        nonlocal nodes
        nodes += 1
        if nodes > MAX_NODES:
            raise ArithmeticError_("expression too large")
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ArithmeticError_("not a number")
            if isinstance(v, int) and abs(v) > MAX_MAGNITUDE:
                raise ArithmeticError_("number too large")
            return _bounded(Fraction(repr(v)) if isinstance(v, float) else Fraction(v))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = walk(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp):
            a, b = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div):
                if b == 0:
                    raise ArithmeticError_("division by zero")
                return _bounded(a / b)
            if isinstance(node.op, ast.Pow):
                return _pow(a, b)
            op = _BINOPS.get(type(node.op))
            if op is None:
                raise ArithmeticError_(f"operator {type(node.op).__name__} not taken")
            return _bounded(op(a, b))
        raise ArithmeticError_(f"{type(node).__name__} is not arithmetic")

    return walk(tree.body)


def _number(text: str) -> Fraction | None:
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def agrees(value: Fraction, stated: str) -> bool:
    """Whether ``stated`` (as written) is ``value``: exactly, or rounded/truncated to the decimals shown."""
    s = _number(stated)
    if s is None:
        return False
    if value == s:
        return True
    decimals = len(stated.split(".", 1)[1]) if "." in stated else 0
    return decimals > 0 and abs(value - s) < Fraction(1, 10**decimals)


_CALC = re.compile(r"<<([^<>=]{1,200})=([^<>]{1,40})>>")
_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?!\d)")
_TIMES = re.compile(r"(?<=[\d)])\s*[x×✕]\s*(?=[\d(])")
# A step: an expression (digits, operators, parentheses, spaces) right before '=', and the number after it.
# A result directly followed by a letter or '/' is a term or a fraction ("= 5A/5", "= 3/4"): no step.
_STEP = re.compile(r"([-+*/^().\d ]*\d[-+*/^().\d ]*)=\s*(-?\d+(?:\.\d+)?)(?![\d.]*\d)(?![A-Za-z/])")
_PARTIAL = re.compile(r"^(?:[+*/]|-\s)")  # an operator whose left operand is text before the run
_IMPLICIT = re.compile(r"(?<=[\d)])\s*(?=\()")
_OPERATOR = re.compile(r"[\d)]\s*(?:\*\*|[-+*/])\s*[-(\d]")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


# LaTeX, as instruct models trained on MATH write it (Qwen2.5: "\\(9 \\times 2 = 18\\)", "\\frac{12}{4} = 3").
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]{1,60})\}\s*\{([^{}]{1,60})\}")
_LATEX = [(re.compile(r"\\(?:times|cdot|ast)(?![A-Za-z])"), " * "), (re.compile(r"\\div(?![A-Za-z])"), " / "),
          (re.compile(r"\\(?:left|right)(?![A-Za-z])"), ""), (re.compile(r"\\[()\[\]]"), " "),
          (re.compile(r"\{,\}"), ","), (re.compile(r"\\[,;!: ]"), " "), (re.compile(r"\\\$"), "$"),
          (re.compile(r"\\text\{([^{}]*)\}"), r" \1 ")]


def _normalise(text: str) -> str:
    for pattern, repl in _LATEX:
        text = pattern.sub(repl, text)
    text = _FRAC.sub(r"(\1)/(\2)", text)
    text = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), text)
    text = text.replace("$", "").replace("÷", "/").replace("·", "*").replace("−", "-").replace("^", "**")
    text = _TIMES.sub(" * ", text)
    return _IMPLICIT.sub("*", text)  # 2(3+4): a product


def _expression(run: str) -> str | None:
    """The arithmetic expression that ends a run of digits, operators and spaces: the longest suffix that
    parses ("Day 2 3 + 4" -> "3 + 4"); None when no suffix with an operator does."""
    run = run.strip()
    if _PARTIAL.match(run):
        return None
    if len(run) > MAX_EXPR_CHARS or _depth(run) > MAX_PAREN_DEPTH:
        return run  # beyond what is checked: safe_eval refuses it, and the step counts as wrong
    starts = [0] + [k + 1 for k, ch in enumerate(run) if ch == " "]
    for k in starts:
        expr = run[k:].strip()
        while expr.startswith("(") and expr.count("(") > expr.count(")"):
            expr = expr[1:].strip()  # an opening parenthesis of the text around the step
        if not _OPERATOR.search(expr):
            return None
        try:
            ast.parse(expr, mode="eval")
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        return expr
    return None


def steps(rationale: str) -> list[tuple[str, str]]:
    """The (expression, stated result) steps of a rationale, in order: calculator annotations and inline
    ``a op b = c`` equations (chains too: ``3 * 4 = 12 - 2 = 10`` is two steps). Text that is not plain
    arithmetic (words, units between operands, a lone number) is no step. At most MAX_STEPS + 1."""
    text = _normalise(rationale)
    found: list[tuple[int, str, str]] = []
    for m in _CALC.finditer(text):
        result = _NUMBER.fullmatch(m.group(2).strip())
        if result is not None:
            found.append((m.start(), m.group(1).strip(), result.group(0)))
    text = _CALC.sub(lambda m: " " * len(m.group(0)), text)  # same offsets, annotations out of the way
    pos = 0
    while len(found) <= MAX_STEPS:
        m = _STEP.search(text, pos)
        if m is None:
            break
        pos = m.start(2)  # the result may begin the next step of a chain
        expr = _expression(m.group(1))
        if expr is not None:
            found.append((m.start(), expr, m.group(2)))
    found.sort(key=lambda f: f[0])
    return [(e, r) for _, e, r in found[: MAX_STEPS + 1]]


def check_rationale(rationale: str, final: str | None) -> str | None:
    """``verify_arithmetic`` when a step's stated result is not what its expression gives (or it cannot be
    computed within the bounds), ``verify_final`` when the final answer is not the last step's result; None
    when every step holds (or there is none: nothing to recompute)."""
    last: Fraction | None = None
    found = steps(rationale)
    if len(found) > MAX_STEPS:
        return ARITHMETIC  # more than is checked: not verified
    for expr, stated in found:
        try:
            value = safe_eval(expr)
        except ArithmeticError_:
            return ARITHMETIC
        if not agrees(value, stated):
            return ARITHMETIC
        last = _number(stated)
    if last is not None and final is not None:
        f = _number(final)
        if f is None or (f != last and not agrees(last, final)):
            return FINAL
    return None


def majority_agrees(answer: str | None, solutions: list[str | None]) -> bool:
    """Whether more than half of the teacher's own solutions reach ``answer`` (unparseable ones count against)."""
    if answer is None or not solutions:
        return False
    return Counter(solutions)[answer] * 2 > len(solutions)


def dump_checks(checks: dict | None) -> str | None:
    return None if checks is None else json.dumps(checks, sort_keys=True, ensure_ascii=False)


def load_checks(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None
