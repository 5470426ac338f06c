"""Operator and job image are upgraded separately, so each must take the other's wire spec. A newer operator
sends fields an older job image does not know; an older operator leaves out fields a newer image has."""

from __future__ import annotations

import base64
import json
import logging

from llm2llm.launch import decode_run, encode_run
from llm2llm.spec import parse_spec, spec_to_wire

SPEC = {"task": {"kind": "gsm8k"}, "data": {"seed": "/d/seed.jsonl"}, "output": "/o",
        "teacher": {"kind": "vllm", "temperature": 0.7}, "loop": {"maxIterations": 4}}


def _arg(wire: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps({"name": "r", "uid": "u", "spec": wire}).encode()).decode()


def test_round_trip():
    spec = parse_spec(SPEC)
    assert decode_run(encode_run("r", "u", spec)) == ("r", "u", spec)


def test_a_newer_operators_fields_are_ignored_with_a_warning(caplog):
    wire = spec_to_wire(parse_spec(SPEC))
    wire["teacher"]["warmPool"] = {"size": 2}           # a nested field from the future
    wire["student"]["training"]["fusedKernels"] = True  # deeper
    wire["caching"] = {"enabled": True}                 # a new top-level block
    with caplog.at_level(logging.WARNING, logger="llm2llm.launch"):
        name, uid, spec = decode_run(_arg(wire))
    assert spec.teacher.temperature == 0.7 and spec.loop.max_iterations == 4
    text = caplog.text
    assert "spec.teacher.warmPool" in text and "spec.student.training.fusedKernels" in text and "spec.caching" in text


def test_an_older_operators_spec_gets_this_images_defaults():
    wire = spec_to_wire(parse_spec(SPEC))
    del wire["teacher"]["structuredOutput"]  # fields an older operator never sent
    del wire["student"]["training"]["precision"]
    del wire["filters"]
    _, _, spec = decode_run(_arg(wire))
    assert spec.teacher.structured_output is True and spec.student.training.precision == "auto"
    assert spec.filters.dedup == "near" and spec.teacher.temperature == 0.7


def test_validation_still_applies_to_known_fields():
    import pytest
    from pydantic import ValidationError

    wire = spec_to_wire(parse_spec(SPEC))
    wire["loop"]["maxIterations"] = 0
    with pytest.raises(ValidationError):
        decode_run(_arg(wire))
