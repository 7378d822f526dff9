"""Structured outputs and ``logit_bias`` in the engine, on the tiny checkpoint.

Its weights are random: what it writes is valid JSON only because the grammar forces it, token by
token. So every output that ends with ``stop`` must validate against its schema (``jsonschema``), greedy
and sampled, mixed in one batch with requests that have no grammar, whose tokens must stay exactly
those of a run without the constrained ones.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from services.common.errors import InvalidArgument
from services.decoder.engine.request import Request, RequestStatus
from services.decoder.engine.response_format import ResponseFormat
from services.decoder.engine.sampling_params import SamplingParams
from services.decoder.types import GenerateInput
from tests.decoder.helpers import run, text_of, tokens_of, user

INVOICE = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^INV-[0-9]{4}$"},
        "paid": {"type": "boolean"},
        "currency": {"enum": ["EUR", "USD", "CNY"]},
        "lines": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 6},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        },
        "note": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]},
    },
    "required": ["id", "paid", "currency", "lines", "note"],
    "additionalProperties": False,
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
MAX_TOKENS = 200  # more than either schema's longest document takes


def inp(rid: str, sampling: SamplingParams, text: str = "Write the invoice as JSON.", max_tokens=MAX_TOKENS):
    return GenerateInput(rid, user(text), sampling=sampling, max_tokens=max_tokens)


def schema_params(schema, **kw) -> SamplingParams:
    return SamplingParams(response_format=ResponseFormat.json_schema(schema), **kw)


def check_valid(events, schema) -> dict:
    assert events[-1].finish_reason == "stop", text_of(events)
    document = json.loads(text_of(events))
    jsonschema.validate(document, schema)
    return document


UNCONSTRAINED = [
    ("plain-greedy", SamplingParams(temperature=0.0, ignore_eos=True), "Tell me about the rain."),
    ("plain-seeded", SamplingParams(temperature=1.0, seed=11, ignore_eos=True), "写一首关于春天的诗"),
]


def test_every_output_validates_and_unconstrained_rows_are_untouched(engine):
    plain = [inp(rid, params, text, 24) for rid, params, text in UNCONSTRAINED]
    alone = run(engine, plain)
    constrained = [
        inp("invoice-greedy", schema_params(INVOICE, temperature=0.0)),
        inp("invoice-sampled", schema_params(INVOICE, temperature=1.0, seed=1)),
        inp("invoice-hot", schema_params(INVOICE, temperature=1.5, top_p=0.95, seed=2)),
        inp("person-greedy", schema_params(PERSON, temperature=0.0), "Who are you?"),
        inp("person-sampled", schema_params(PERSON, temperature=0.8, top_k=50, seed=3), "Who are you?"),
        inp("person-penalised", schema_params(PERSON, temperature=1.0, seed=4, repetition_penalty=1.3)),
        inp(
            "biased",
            SamplingParams(temperature=1.0, seed=5, logit_bias={100: 5.0}, ignore_eos=True),
            max_tokens=8,
        ),
    ]
    plain = [inp(rid, params, text, 24) for rid, params, text in UNCONSTRAINED]
    mixed = run(engine, [*plain, *constrained], arrivals=[0, 2, 0, 1, 0, 3, 1, 2, 0])
    for rid, *_ in UNCONSTRAINED:
        assert tokens_of(mixed[rid]) == tokens_of(alone[rid]), rid
    documents = [check_valid(mixed[f"invoice-{k}"], INVOICE) for k in ("greedy", "sampled", "hot")]
    documents += [check_valid(mixed[f"person-{k}"], PERSON) for k in ("greedy", "sampled", "penalised")]
    assert len({json.dumps(d) for d in documents}) == len(documents)  # the model, not a template, wrote them


def test_the_grammar_ends_the_request_with_its_eos_token(engine):
    events = run(engine, [inp("eos", schema_params(PERSON, temperature=0.0))])["eos"]
    ids = tokens_of(events)
    assert ids[-1] in engine.eos_token_ids and events[-1].finish_reason == "stop"
    assert text_of(events).endswith("}")  # the closing brace is text; the end-of-sequence token is not


def test_greedy_structured_output_is_deterministic_and_seeded_is_reproducible(engine):
    first = run(engine, [inp("g1", schema_params(INVOICE, temperature=0.0))])["g1"]
    again = run(engine, [inp("g2", schema_params(INVOICE, temperature=0.0))])["g2"]
    assert tokens_of(first) == tokens_of(again)
    a = run(engine, [inp("s1", schema_params(INVOICE, temperature=1.2, seed=9))])["s1"]
    b = run(engine, [inp("s2", schema_params(INVOICE, temperature=1.2, seed=9))])["s2"]
    assert tokens_of(a) == tokens_of(b) != tokens_of(first)


def test_json_object_is_an_object(engine):
    # seeds whose sampled objects close within the budget (random weights may also write on and on)
    outs = run(
        engine,
        [
            inp(
                f"o{s}", SamplingParams(temperature=1.0, seed=s, response_format=ResponseFormat.json_object())
            )
            for s in (7, 8, 9)
        ],
    )
    finished = [e for e in outs.values() if e[-1].finish_reason == "stop"]
    assert finished
    for events in finished:
        assert isinstance(json.loads(text_of(events)), dict)
    for events in outs.values():
        assert text_of(events).startswith("{")


def test_a_length_end_leaves_a_prefix_of_a_valid_document(engine):
    events = run(engine, [inp("short", schema_params(INVOICE, temperature=0.0), max_tokens=6)])["short"]
    assert events[-1].finish_reason == "length" and len(tokens_of(events)) == 6
    whole = run(engine, [inp("whole", schema_params(INVOICE, temperature=0.0))])["whole"]
    assert text_of(whole).startswith(text_of(events))


@pytest.mark.parametrize(
    "schema,message",
    [
        ({"type": "foo"}, "Invalid type"),
        ({"type": "string", "pattern": "(("}, "regex"),
        ({"$ref": "#/definitions/missing"}, "does not exist"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "Unsatisfiable"),
    ],
    ids=["unknown-type", "bad-pattern", "dangling-ref", "unsatisfiable"],
)
def test_a_schema_the_library_refuses_is_invalid_with_its_reason(engine, schema, message):
    req = engine.make_request(inp("bad", schema_params(schema)))
    with pytest.raises(InvalidArgument) as err:
        engine.add_request(req)
    assert err.value.reason == "response_format_invalid" and message in err.value.message
    assert not engine.has_unfinished


def test_compiles_are_cached_by_schema(engine):
    schema = {**PERSON, "description": "cached"}
    hits = engine.grammars.stats["hits"]
    first = engine.make_request(inp("c1", schema_params(schema)))
    first.grammar.wait()
    second = engine.make_request(inp("c2", schema_params(json.loads(json.dumps(schema, indent=2)))))
    assert engine.grammars.stats["hits"] == hits + 1
    second.grammar.wait()
    assert second.grammar.matcher is not first.grammar.matcher  # each request has its own state


def _wide(n: int) -> dict:
    return {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(n)}}


def test_a_compile_over_its_budget_is_too_complex_even_from_the_cache(engine):
    schema = _wide(600)  # tens of milliseconds to compile, over a 1 ms budget
    fmt = ResponseFormat.json_schema(schema)
    tight = engine.make_request(
        inp("tight", SamplingParams(response_format=ResponseFormat(fmt.kind, fmt.schema, 1)))
    )
    with pytest.raises(InvalidArgument) as err:
        tight.grammar.wait()
    assert err.value.reason == "response_format_too_complex"
    engine.make_request(inp("ample", SamplingParams(response_format=fmt))).grammar.wait()  # now cached
    again = engine.make_request(
        inp("tight2", SamplingParams(response_format=ResponseFormat(fmt.kind, fmt.schema, 1)))
    )
    with pytest.raises(InvalidArgument) as err:
        again.grammar.wait()
    assert err.value.reason == "response_format_too_complex"


def test_a_schema_over_the_decoders_bound_is_too_large(engine):
    schema = {"enum": ["x" * 1000] * 300}  # 300 kB, over 256 KiB
    with pytest.raises(InvalidArgument) as err:
        engine.make_request(inp("big", schema_params(schema)))
    assert err.value.reason == "response_format_too_large"


def test_a_token_the_grammar_refuses_ends_the_request_with_an_error(engine, tokenizer):
    req = engine.make_request(inp("refuse", schema_params(PERSON)))
    req.grammar.wait()
    letter = tokenizer.convert_tokens_to_ids("x")
    assert req.grammar.advance(letter) is RequestStatus.FINISHED_ERROR  # a document starts with "{"


# -- logit_bias ------------------------------------------------------------------------------------


def test_a_large_bias_forces_its_token_greedy_and_sampled(engine):
    greedy = run(engine, [inp("plain", SamplingParams(temperature=0.0, ignore_eos=True), max_tokens=6)])[
        "plain"
    ]
    target = next(t for t in range(100, 1000) if t not in tokens_of(greedy))
    outs = run(
        engine,
        [
            inp(
                "up-greedy",
                SamplingParams(temperature=0.0, logit_bias={target: 100}, ignore_eos=True),
                max_tokens=6,
            ),
            inp(
                "up-sampled",
                SamplingParams(temperature=2.0, seed=1, logit_bias={target: 100}, ignore_eos=True),
                max_tokens=6,
            ),
        ],
    )
    assert tokens_of(outs["up-greedy"]) == [target] * 6 == tokens_of(outs["up-sampled"])
    first = tokens_of(greedy)[0]
    down = run(
        engine,
        [
            inp(
                "down",
                SamplingParams(temperature=0.0, logit_bias={first: -100}, ignore_eos=True),
                max_tokens=1,
            )
        ],
    )
    assert tokens_of(down["down"]) != [first]


def test_a_bias_is_added_before_the_greedy_argmax(engine, reference):
    """The biased greedy token is the argmax of the model's logits plus the bias."""
    lm, head = reference.model.model.language_model, reference.model.lm_head
    prompt = engine.make_request(inp("p", SamplingParams(temperature=0.0), "Tell me about the rain.", 1))
    with torch.no_grad():
        logits = head(lm(input_ids=torch.tensor([prompt.prompt_token_ids])).last_hidden_state[0, -1]).float()
    second, best = logits.topk(2).indices.tolist()[::-1]
    gap = float(logits[best] - logits[second])
    bias = {second: gap + 0.5}
    got = run(
        engine, [inp("b", SamplingParams(temperature=0.0, logit_bias=bias), "Tell me about the rain.", 1)]
    )["b"]
    assert tokens_of(got) == [second]
    got = run(
        engine,
        [
            inp(
                "c",
                SamplingParams(temperature=0.0, logit_bias={second: gap - 0.5}),
                "Tell me about the rain.",
                1,
            )
        ],
    )["c"]
    assert tokens_of(got) == [best]


def test_a_bias_cannot_bring_back_what_the_grammar_forbids(engine, tokenizer):
    letter = tokenizer.convert_tokens_to_ids("x")
    params = schema_params(PERSON, temperature=0.0, logit_bias={letter: 100})
    check_valid(run(engine, [inp("both", params)])["both"], PERSON)


def test_a_token_id_outside_the_vocabulary_is_invalid(engine):
    with pytest.raises(InvalidArgument) as err:
        engine.make_request(inp("far", SamplingParams(logit_bias={engine.vocab_size: 1.0})))
    assert err.value.reason == "logit_bias_unknown_token"


def test_requests_without_either_leave_the_logits_untouched():
    from services.decoder.engine.logit_constraints import allowed_tokens, apply_logit_constraints

    logits = torch.randint(-8, 8, (3, 70)).float()  # integers: a bias adds exactly
    requests = [Request(f"r{i}", [1], SamplingParams(), 4) for i in range(3)]
    assert apply_logit_constraints(logits, requests) is logits
    requests[1].sampling_params.logit_bias = {5: 2.0, 69: -1.0}
    out = apply_logit_constraints(logits, requests)
    assert out is not logits and torch.equal(out[[0, 2]], logits[[0, 2]])
    assert torch.equal(
        out[1] - logits[1], torch.zeros(70).index_put_((torch.tensor([5, 69]),), torch.tensor([2.0, -1.0]))
    )
    packed = torch.tensor([[-(2**31) | 5, 0, 1]], dtype=torch.int32)  # tokens 0, 2, 31 and 64
    want = torch.zeros(1, 70, dtype=torch.bool)
    want[0, [0, 2, 31, 64]] = True
    assert torch.equal(allowed_tokens(packed, 70), want)
    assert torch.equal(allowed_tokens(packed, 100)[:, 70:], torch.zeros(1, 30, dtype=torch.bool))
    words = torch.randint(
        -(2**31), 2**31 - 1, (3, 5), dtype=torch.int32, generator=torch.Generator().manual_seed(1)
    )
    bits = [[(int(words[g, t // 32]) >> (t % 32)) & 1 == 1 for t in range(160)] for g in range(3)]
    assert allowed_tokens(words, 160).tolist() == bits  # bit t % 32 of word t // 32, as llguidance packs it


def test_a_model_vocabulary_wider_than_its_tokenizer_is_padded(tmp_path):
    """Checkpoints often pad the embedding rows past the tokenizer's ids: the grammar's tokenizer is
    built over the model's rows, and the ids no token has are never allowed."""
    from services.common.tiny_checkpoint import make_tiny_checkpoint
    from services.decoder.engine.llm_engine import LLMEngine
    from tests.decoder.helpers import make_config

    ckpt = make_tiny_checkpoint(tmp_path / "padded", preset="tiny", text_overrides={"vocab_size": 1100})
    engine = LLMEngine(make_config(ckpt))
    try:
        assert engine.vocab_size == 1100 and len(engine.tokenizer) == 1024
        assert engine.grammars.mask_words * 32 >= 1100
        events = run(engine, [inp("pad", schema_params(PERSON, temperature=2.0, seed=2))])["pad"]
        check_valid(events, PERSON)
        assert max(tokens_of(events)) < 1024
    finally:
        engine.shutdown()


def test_the_demo_models_tokenizer_takes_a_grammar():
    from services.common.checkpoint import Checkpoint
    from services.decoder.engine.structured import GrammarCompiler
    from services.decoder.prompting import load_prompt_builder
    from services.demo import demo_model_path

    demo = Checkpoint.open(demo_model_path())
    tokenizer = load_prompt_builder(demo).tokenizer
    compiler = GrammarCompiler(tokenizer, int(demo.text_config["vocab_size"]), [tokenizer.eos_token_id])
    try:
        compiler.grammar_for(ResponseFormat.json_schema(INVOICE)).wait()
    finally:
        compiler.close()
