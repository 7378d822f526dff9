"""The checks of ``response_format`` and ``logit_bias`` on their own (pure Python, no engine)."""

from __future__ import annotations

import json
import math

import pytest

from services.common.errors import InvalidArgument
from services.common.limits import MAX_SCHEMA_BYTES
from services.decoder.engine.request import Request
from services.decoder.engine.response_format import (
    ANY_OBJECT,
    MAX_SCHEMA_DEPTH,
    ResponseFormat,
    check_logit_bias,
    parse_logit_bias,
)
from services.decoder.engine.sampling_params import SamplingParams

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}


def test_the_schema_is_carried_as_canonical_json_in_its_own_key_order():
    spaced = json.dumps(SCHEMA, indent=4)
    fmt = ResponseFormat.json_schema(spaced)
    assert fmt == ResponseFormat.json_schema(SCHEMA)
    assert fmt.schema == '{"type":"object","properties":{"b":{"type":"integer"},"a":{"type":"string"}}}'
    assert fmt.grammar_source == fmt.schema
    assert ResponseFormat.json_object().grammar_source == ANY_OBJECT
    assert fmt.validate() is fmt


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"anyOf": [schema]}  # two levels of JSON per step: an object and a list
    return schema


@pytest.mark.parametrize(
    "fmt,reason",
    [
        (ResponseFormat("xml"), "response_format_invalid"),
        (ResponseFormat("json_object", schema="{}"), "response_format_invalid"),
        (ResponseFormat("json_schema"), "response_format_invalid"),
        (ResponseFormat("json_schema", schema="[1, 2]"), "response_format_invalid"),
        (ResponseFormat("json_schema", schema="{not json"), "response_format_invalid"),
        (ResponseFormat.json_schema({"x-guidance": {"lenient": True}}), "response_format_invalid"),
        (ResponseFormat.json_schema(_nested(MAX_SCHEMA_DEPTH)), "response_format_invalid"),
        (ResponseFormat(ResponseFormat.json_object().kind, max_compile_ms=-1), "response_format_invalid"),
        (
            ResponseFormat.json_schema({"enum": ["x" * 100] * (MAX_SCHEMA_BYTES // 100)}),
            "response_format_too_large",
        ),
    ],
    ids=[
        "unknown-kind",
        "json-object-with-schema",
        "json-schema-without-schema",
        "schema-an-array",
        "schema-not-json",
        "x-guidance",
        "too-deep",
        "negative-budget",
        "too-large",
    ],
)
def test_bad_response_formats_are_refused_with_a_reason(fmt, reason):
    with pytest.raises(InvalidArgument) as err:
        fmt.validate()
    assert err.value.reason == reason


def test_a_schema_nested_just_within_the_bound_is_accepted():
    ResponseFormat.json_schema(_nested(MAX_SCHEMA_DEPTH // 2 - 1)).validate()


@pytest.mark.parametrize("text", ["NaN", '{"const": NaN}', '{"a": Infinity}'])
def test_what_json_cannot_hold_is_refused(text):
    with pytest.raises(InvalidArgument) as err:
        ResponseFormat.json_schema(text)
    assert err.value.reason == "response_format_invalid"


@pytest.mark.parametrize(
    "bias,vocab,reason",
    [
        ({i: 1.0 for i in range(301)}, None, "logit_bias_invalid"),
        ({-1: 1.0}, None, "logit_bias_invalid"),
        ({True: 1.0}, None, "logit_bias_invalid"),
        ({5: 100.5}, None, "logit_bias_out_of_range"),
        ({5: -101}, None, "logit_bias_out_of_range"),
        ({5: math.nan}, None, "logit_bias_out_of_range"),
        ({5: math.inf}, None, "logit_bias_out_of_range"),
        ({5: "1"}, None, "logit_bias_out_of_range"),
        ({1024: 1.0}, 1024, "logit_bias_unknown_token"),
    ],
    ids=[
        "301-entries",
        "negative-id",
        "bool-id",
        "over-100",
        "under-minus-100",
        "nan",
        "inf",
        "string",
        "past-vocab",
    ],
)
def test_bad_logit_biases_are_refused_with_a_reason(bias, vocab, reason):
    with pytest.raises(InvalidArgument) as err:
        check_logit_bias(bias, vocab)
    assert err.value.reason == reason


def test_good_logit_biases_pass_as_floats():
    bias = {i: (-100 if i % 2 else 100) for i in range(300)}
    assert check_logit_bias(bias, 1024) == {i: float(v) for i, v in bias.items()}


def test_openai_keys_are_token_ids_as_decimal_strings():
    assert parse_logit_bias({"50256": -100, " 7 ": 3}) == {50256: -100, 7: 3}
    for key in ["abc", "-1", "1.5", "", "٣", "1" * 13]:
        with pytest.raises(InvalidArgument) as err:
            parse_logit_bias({key: 1})
        assert err.value.reason == "logit_bias_invalid"


def test_sampling_params_validate_both():
    params = SamplingParams(logit_bias={3: 2}, response_format=ResponseFormat.json_schema(SCHEMA))
    assert params.validate(vocab_size=1024).logit_bias == {3: 2.0}
    with pytest.raises(InvalidArgument):
        SamplingParams(logit_bias={3000: 2}).validate(vocab_size=1024)
    with pytest.raises(InvalidArgument):
        SamplingParams(response_format=ResponseFormat("yaml")).validate()


def test_a_grammar_is_host_state_the_engine_must_wait_for():
    plain = SamplingParams(logit_bias={3: 2.0})
    structured = SamplingParams(response_format=ResponseFormat.json_object())
    assert not plain.needs_host_state and structured.needs_host_state
    assert not Request("a", [1], plain, 4).needs_sync
    assert Request("b", [1], structured, 4, grammar=object()).needs_sync
