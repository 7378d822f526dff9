"""What a request asks of the shape of its output (``response_format``) and of single tokens
(``logit_bias``), and the checks of both (pure Python, no torch).

``ResponseFormat`` constrains the output to JSON: ``json_object`` (any JSON object) or ``json_schema`` (a
document valid against ``schema``). The schema travels as canonical JSON text: no insignificant
whitespace, keys in the order the caller wrote them (the grammar emits properties in that order, so two
orders are two grammars). The decoder compiles it (``engine.structured``), caches it by that text and
enforces it token by token. ``max_compile_ms`` is the compile budget the gateway grants from the
tenant's limits; 0 leaves the decoder's own bound.

``logit_bias`` maps a token id to a bias added to its logit before temperature and filters (OpenAI's
``logit_bias``): at most 300 entries of -100..100, ids inside the model's vocabulary.

The reasons of the refusals are the ``REASON_*`` names below; README ("Structured outputs") and
docs/bad-input.md list them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.common.errors import InvalidArgument
from services.common.limits import (
    MAX_ABS_LOGIT_BIAS,
    MAX_GRAMMAR_COMPILE_MS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_SCHEMA_BYTES,
)

KIND_JSON_OBJECT = "json_object"
KIND_JSON_SCHEMA = "json_schema"
KINDS = (KIND_JSON_OBJECT, KIND_JSON_SCHEMA)
ANY_OBJECT = '{"type":"object"}'  # the schema of json_object
MAX_SCHEMA_DEPTH = 64  # nesting of the schema document itself (objects and arrays)

REASON_INVALID = "response_format_invalid"
REASON_TOO_LARGE = "response_format_too_large"
REASON_TOO_COMPLEX = "response_format_too_complex"
REASON_BIAS_INVALID = "logit_bias_invalid"
REASON_BIAS_OUT_OF_RANGE = "logit_bias_out_of_range"
REASON_BIAS_UNKNOWN_TOKEN = "logit_bias_unknown_token"


def canonical_json(value: Any) -> str:
    """``value`` as compact JSON, keys in their order; InvalidArgument for what JSON cannot hold."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidArgument(
            f"response_format: the schema is not JSON ({exc})", reason=REASON_INVALID
        ) from None


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON document, walked without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_SCHEMA_DEPTH:
                stack.extend(
                    (child, depth + 1) for child in (node.values() if isinstance(node, dict) else node)
                )
    return deepest


@dataclass(frozen=True)
class ResponseFormat:
    """Constrain the output to JSON (see the module docstring)."""

    kind: str
    schema: str = ""  # json_schema: the schema as canonical JSON
    max_compile_ms: int = 0  # 0: the decoder's bound

    @classmethod
    def json_object(cls) -> ResponseFormat:
        return cls(KIND_JSON_OBJECT)

    @classmethod
    def json_schema(cls, schema: Any) -> ResponseFormat:
        """From a parsed schema (an object, or a boolean) or its JSON text."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except (ValueError, RecursionError) as exc:
                raise InvalidArgument(
                    f"response_format: the schema is not JSON ({exc})", reason=REASON_INVALID
                ) from None
        return cls(KIND_JSON_SCHEMA, canonical_json(schema))

    @property
    def grammar_source(self) -> str:
        """The JSON schema the grammar is compiled from (also its cache key)."""
        return self.schema if self.kind == KIND_JSON_SCHEMA else ANY_OBJECT

    @property
    def schema_bytes(self) -> int:
        return len(self.schema.encode("utf-8", "surrogatepass"))

    def check_size(self, max_schema_bytes: int) -> None:
        if self.schema_bytes > max_schema_bytes:
            raise InvalidArgument(
                f"response_format: the schema has {self.schema_bytes} bytes (as compact JSON), over the "
                f"limit of {max_schema_bytes}",
                reason=REASON_TOO_LARGE,
            )

    def validate(self, max_schema_bytes: int = MAX_SCHEMA_BYTES) -> ResponseFormat:
        """InvalidArgument unless the kind is known, a schema comes with json_schema only, the schema is
        JSON (an object or a boolean) of at most ``max_schema_bytes`` and ``MAX_SCHEMA_DEPTH`` levels
        without the library's own ``x-guidance`` options, and the budget is in range."""
        if self.kind not in KINDS:
            raise InvalidArgument(
                f"response_format.type must be one of {', '.join(KINDS)}, got {self.kind!r}",
                reason=REASON_INVALID,
            )
        if not isinstance(self.max_compile_ms, int) or not 0 <= self.max_compile_ms <= MAX_GRAMMAR_COMPILE_MS:
            raise InvalidArgument(
                f"response_format: max_compile_ms must be in 0..{MAX_GRAMMAR_COMPILE_MS}, got {self.max_compile_ms!r}",
                reason=REASON_INVALID,
            )
        if self.kind == KIND_JSON_OBJECT:
            if self.schema:
                raise InvalidArgument("response_format: json_object takes no schema", reason=REASON_INVALID)
            return self
        self.check_size(max_schema_bytes)
        try:
            parsed = json.loads(self.schema)
        except (ValueError, RecursionError):
            raise InvalidArgument(
                "response_format: json_schema needs a schema (a JSON object)", reason=REASON_INVALID
            ) from None
        if not isinstance(parsed, dict | bool):
            raise InvalidArgument(
                "response_format: the schema must be a JSON object (or a boolean)", reason=REASON_INVALID
            )
        if _depth(parsed) > MAX_SCHEMA_DEPTH:
            raise InvalidArgument(
                f"response_format: the schema nests deeper than {MAX_SCHEMA_DEPTH} levels",
                reason=REASON_INVALID,
            )
        if isinstance(parsed, dict) and "x-guidance" in parsed:
            raise InvalidArgument(
                "response_format: the schema's 'x-guidance' options are not accepted", reason=REASON_INVALID
            )
        return self


def check_logit_bias(bias: Mapping[int, float], vocab_size: int | None = None) -> dict[int, float]:
    """``bias`` as a plain dict, or InvalidArgument: more than 300 entries, an id that is not a
    non-negative integer (or is past ``vocab_size`` when known), a bias that is not a finite number in
    -100..100."""
    if not isinstance(bias, Mapping):
        raise InvalidArgument("logit_bias must map token ids to biases", reason=REASON_BIAS_INVALID)
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidArgument(
            f"logit_bias has {len(bias)} entries, over the limit of {MAX_LOGIT_BIAS_ENTRIES}",
            reason=REASON_BIAS_INVALID,
        )
    out: dict[int, float] = {}
    for token, value in bias.items():
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise InvalidArgument(
                f"logit_bias: token ids are non-negative integers, got {token!r}", reason=REASON_BIAS_INVALID
            )
        if vocab_size is not None and token >= vocab_size:
            raise InvalidArgument(
                f"logit_bias: token id {token} is outside the vocabulary (size {vocab_size})",
                reason=REASON_BIAS_UNKNOWN_TOKEN,
            )
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or abs(value) > MAX_ABS_LOGIT_BIAS
        ):
            raise InvalidArgument(
                f"logit_bias: the bias of token {token} must be a number in -100..100, got {value!r}",
                reason=REASON_BIAS_OUT_OF_RANGE,
            )
        out[token] = float(value)
    return out


def parse_logit_bias(bias: Mapping[str, Any]) -> dict[int, Any]:
    """OpenAI's ``{"token id as a string": bias}`` with integer keys; InvalidArgument for a key that is
    not a token id. The values are checked by ``check_logit_bias``."""
    out: dict[int, Any] = {}
    for key, value in bias.items():
        text = key.strip() if isinstance(key, str) else ""
        if not text.isascii() or not text.isdigit() or len(text) > 12:
            raise InvalidArgument(
                f"logit_bias: keys are token ids (decimal strings), got {key!r}", reason=REASON_BIAS_INVALID
            )
        out[int(text)] = value
    return out
