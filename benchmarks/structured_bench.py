"""Structured outputs on the CPU: what a grammar costs a decode step, and what a schema costs to compile.

(a) The engine, batch 16 (64-token prompts, 48 generated tokens, greedy, all 16 decoding together) on
    the `small` tiny checkpoint: free text against every row constrained by a 50-property invoice
    schema, in interleaved rounds. Inside each constrained step the grammar's parts are timed: the
    mask fill (llguidance, all rows in one call), its application (unpacking the bitmask and masking the
    logits with tensor ops) and the matchers' advance (the scheduler's hook, one token per row). Reported
    per row and step in microseconds, and as a share of the constrained step (target <= 10%).
(b) Compiling the 50-property invoice schema: cold (a schema the cache has not seen, through the
    engine's compile pool, handoff included) and cached (the LRU hit plus the per-request matcher copy;
    target <= 1 ms).
(c) Peers, when installed (``xgrammar``, ``outlines_core``): the same schema's compile and the mask fill
    per row at batch 16 over the same tokenizer, and every library's installed size (its files and
    those of the dependencies it pulls in that this project does not already have).

The machine may be shared: CPU time (``time.process_time``) is what a step cost; the grammar's parts
are wall time (``time.perf_counter``) on the engine thread, with one torch thread.

    python benchmarks/structured_bench.py [--checkpoint DIR] [--rounds 3] [--threads 1]
                                          [--out benchmarks/results/structured.json]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from services.common.checkpoint import Checkpoint
from services.common.tiny_checkpoint import make_tiny_checkpoint
from services.decoder.engine import logit_constraints, sampler, structured
from services.decoder.engine.request import Request
from services.decoder.engine.response_format import ResponseFormat
from services.decoder.engine.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.engine_common import Meter, machine, make_bench_engine, random_prompts, write_results  # noqa: E402

BATCH = 16
PROMPT_TOKENS = 64
OUTPUT_TOKENS = 48


def invoice_schema(n: int = 50, salt: str = "") -> dict:
    """An invoice of ``n`` required properties (strings, integers, numbers, booleans, enums) and lines."""
    kinds = [
        {"type": "string", "maxLength": 24},
        {"type": "integer", "minimum": 0},
        {"type": "number"},
        {"type": "boolean"},
        {"enum": ["EUR", "USD", "CNY", "JPY"]},
    ]
    props = {f"field_{i:02d}{salt}": kinds[i % len(kinds)] for i in range(n - 1)}
    line = {
        "type": "object",
        "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}, "price": {"type": "number"}},
        "required": ["sku", "qty", "price"],
        "additionalProperties": False,
    }
    props["lines"] = {"type": "array", "items": line, "minItems": 1}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


class GrammarTimer:
    """Wall time of the grammar's parts within a step, by wrapping the functions the engine calls: the
    sampler's ``apply_logit_constraints`` (the logits' copy, the mask's fill and its application), the
    fill alone, and ``Grammar.advance``."""

    def __init__(self):
        self.fill = self.apply = self.advance = 0.0
        self._fill = logit_constraints.fill_bitmask
        self._apply = sampler.apply_logit_constraints
        self._advance = structured.Grammar.advance

    def reset(self) -> None:
        self.fill = self.apply = self.advance = 0.0

    def install(self) -> None:
        timer = self

        def fill(grammars):
            t = time.perf_counter()
            try:
                return timer._fill(grammars)
            finally:
                timer.fill += time.perf_counter() - t

        def apply(logits, requests):
            t = time.perf_counter()
            try:
                return timer._apply(logits, requests)
            finally:
                timer.apply += time.perf_counter() - t

        def advance(grammar, token):
            t = time.perf_counter()
            try:
                return timer._advance(grammar, token)
            finally:
                timer.advance += time.perf_counter() - t

        logit_constraints.fill_bitmask = fill
        sampler.apply_logit_constraints = apply
        structured.Grammar.advance = advance

    def remove(self) -> None:
        logit_constraints.fill_bitmask = self._fill
        sampler.apply_logit_constraints = self._apply
        structured.Grammar.advance = self._advance


class EngineRun:
    """One engine, warmed once; each ``run(mode)`` submits the 16 requests again."""

    def __init__(self, ckpt_dir: Path):
        self.eng = make_bench_engine(ckpt_dir)
        self.prompts = random_prompts(ckpt_dir, BATCH, PROMPT_TOKENS)
        self.fmt = ResponseFormat.json_schema(invoice_schema())
        self.runs = 0
        self.timer = GrammarTimer()
        for mode in ("plain", "json_schema"):
            self.run(mode)  # warm-up (and the schema's compile)

    def run(self, mode: str) -> dict:
        eng = self.eng
        self.runs += 1
        for i, ids in enumerate(self.prompts):
            fmt = self.fmt if mode == "json_schema" else None
            params = SamplingParams(temperature=0.0, ignore_eos=True, response_format=fmt)
            grammar = eng.grammars.grammar_for(fmt)
            req = Request(f"{mode}-{self.runs}-{i}", ids, params, OUTPUT_TOKENS, grammar=grammar)
            eng.add_request(req)
        steps: list[tuple[Meter, float, float, float]] = []
        self.timer.install()
        try:
            while eng.has_unfinished:
                decoding = eng.scheduler.num_running() == BATCH and all(
                    r.num_computed_tokens == r.num_tokens - 1 for r in eng.scheduler.running
                )
                self.timer.reset()
                with Meter() as m:
                    events = eng.step()
                if decoding and len(events) == BATCH and all(len(e.token_ids) == 1 for e in events):
                    t = self.timer
                    steps.append((m, t.fill, t.apply - t.fill, t.advance))
        finally:
            self.timer.remove()
        med = statistics.median
        out = {
            "decode_step_ms": med(s[0].wall for s in steps) * 1e3,
            "decode_step_cpu_ms": med(s[0].cpu for s in steps) * 1e3,
            "decode_steps_measured": len(steps),
        }
        if mode == "json_schema":
            out["mask_fill_us_per_row"] = med(s[1] for s in steps) / BATCH * 1e6
            out["mask_apply_us_per_row"] = med(s[2] for s in steps) / BATCH * 1e6
            out["advance_us_per_row"] = med(s[3] for s in steps) / BATCH * 1e6
            grammar = [s[1] + s[2] + s[3] for s in steps]
            out["grammar_us_per_row"] = med(grammar) / BATCH * 1e6
            out["grammar_share_of_step"] = med(g / s[0].wall for g, s in zip(grammar, steps, strict=True))
        return out


def bench_engine(ckpt: Path, rounds: int) -> dict:
    engine = EngineRun(ckpt)
    names = ["plain", "json_schema"]
    per_round: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % 2 :] + names[: r % 2]:
            per_round[name].append(engine.run(name))
            print(f"engine round {r} {name}", per_round[name][-1], flush=True)
    engine.eng.shutdown()
    medians = {n: {k: statistics.median(x[k] for x in per_round[n]) for k in per_round[n][0]} for n in names}
    plain, constrained = per_round["plain"], per_round["json_schema"]
    pairs = list(zip(plain, constrained, strict=True))
    medians["constrained_vs_plain_step"] = statistics.median(
        c["decode_step_ms"] / p["decode_step_ms"] for p, c in pairs
    )
    medians["constrained_vs_plain_step_cpu"] = statistics.median(
        c["decode_step_cpu_ms"] / p["decode_step_cpu_ms"] for p, c in pairs
    )
    return {"medians": medians, "rounds": per_round}


def bench_compile(ckpt: Path, cold: int = 12, cached: int = 200) -> dict:
    """The 50-property schema's compile through the engine's own compiler (``GrammarCompiler``)."""
    from services.decoder.prompting import load_prompt_builder

    checkpoint = Checkpoint.open(ckpt)
    tokenizer = load_prompt_builder(checkpoint).tokenizer
    vocab = int(checkpoint.text_config["vocab_size"])
    eos = [tokenizer.eos_token_id]
    with Meter() as built:
        compiler = structured.GrammarCompiler(tokenizer, vocab, eos)
        _ = compiler.mask_words  # waits for the tokenizer's trie
    compiler.grammar_for(ResponseFormat.json_object()).wait()  # warm the pool
    cold_ms, worker_ms = [], []
    for k in range(cold):
        fmt = ResponseFormat.json_schema(invoice_schema(salt=f"_{k}"))
        t = time.perf_counter()
        grammar = compiler.grammar_for(fmt)
        grammar.wait()
        cold_ms.append((time.perf_counter() - t) * 1e3)
        worker_ms.append(compiler.compile(fmt.grammar_source).result().compile_ms)
    fmt = ResponseFormat.json_schema(invoice_schema(salt="_0"))
    hits = []
    for _ in range(cached):
        t = time.perf_counter()
        compiler.grammar_for(fmt).wait()
        hits.append((time.perf_counter() - t) * 1e3)
    compiler.close()
    return {
        "schema_bytes": fmt.schema_bytes,
        "tokenizer_build_ms": built.wall * 1e3,
        "cold_ms": statistics.median(cold_ms),
        "cold_ms_in_the_worker": statistics.median(worker_ms),
        "cached_ms": statistics.median(hits),
        "cached_ms_p99": sorted(hits)[int(0.99 * len(hits))],
        "cache_hits": compiler.stats["hits"],
    }


def _previous_apply(logits: torch.Tensor, packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The first version, kept to compare: bits unpacked with shifts, then ``masked_fill``."""
    b, words = packed.shape
    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((packed.unsqueeze(-1) >> shifts) & 1).view(b, words * 32)[:, : logits.shape[1]].bool()
    x = logits.clone()
    return x.index_copy_(0, rows, x.index_select(0, rows).masked_fill_(~allowed, float("-inf")))


def bench_apply(vocabs: tuple[int, ...] = (1024, 151_936), steps: int = 20) -> dict:
    """The mask's application alone (random masks, no grammar), batch 16, µs per row: what
    ``mask_disallowed`` does after the fill (the additive mask from a byte table, one addition),
    against the first version (shifts and ``masked_fill``)."""
    out = {}
    gen = torch.Generator().manual_seed(0)
    for vocab in vocabs:
        logits = torch.randn(BATCH, vocab, generator=gen)
        words = (vocab + 31) // 32
        packed = torch.randint(-(2**31), 2**31 - 1, (BATCH, words), dtype=torch.int32, generator=gen)
        rows = torch.arange(BATCH)
        now = logits + logit_constraints.additive_mask(packed, vocab)
        assert torch.equal(now, _previous_apply(logits, packed, rows))
        for name in ("now", "before"):
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                if name == "now":
                    logits + logit_constraints.additive_mask(packed, vocab)
                else:
                    _previous_apply(logits, packed, rows)
                times.append(time.perf_counter() - t)
            out[f"vocab_{vocab}_{name}_us_per_row"] = statistics.median(times) / BATCH * 1e6
    return out


def _walk(fill, advance, batch: int, vocab: int, steps: int = 60) -> float:
    """µs per row of ``fill(mask)`` at ``batch`` rows, each row advancing along its allowed argmax of
    random logits (the same path for every library)."""
    gen = torch.Generator().manual_seed(0)
    words = (vocab + 31) // 32
    mask = torch.zeros((batch, words), dtype=torch.int32)
    total = 0.0
    for _ in range(steps):
        t = time.perf_counter()
        fill(mask)
        total += time.perf_counter() - t
        allowed = logit_constraints.allowed_tokens(mask, vocab)
        tokens = torch.randn(batch, vocab, generator=gen).masked_fill(~allowed, float("-inf")).argmax(-1)
        advance(tokens.tolist())
    return total / steps / batch * 1e6


def _installed_mb(*dists: str) -> dict[str, float | None]:
    """MB of each distribution's installed files; None for one not installed here."""
    out: dict[str, float | None] = {}
    for name in dists:
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
            continue
        out[name] = sum(f.locate().stat().st_size for f in files if f.locate().exists()) / 1e6
    return out


def peers(ckpt: Path) -> dict:
    """The same schema and tokenizer through each grammar library that is installed."""
    from services.decoder.prompting import load_prompt_builder

    tokenizer = load_prompt_builder(Checkpoint.open(ckpt)).tokenizer
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    schema = json.dumps(invoice_schema())
    out: dict[str, dict] = {}
    out["llguidance"] = _llguidance(tokenizer, vocab, eos, schema)
    for name, fn in (("xgrammar", _xgrammar), ("outlines_core", _outlines)):
        try:
            out[name] = fn(tokenizer, vocab, eos, schema)
        except ImportError:
            out[name] = {"installed": False}
    return out


def _llguidance(tokenizer, vocab, eos, schema) -> dict:
    import llguidance
    import llguidance.hf

    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=[eos])
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=structured.JSON_OPTIONS)
    matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
    compile_ms = (time.perf_counter() - t) * 1e3
    rows = [matcher.deep_copy() for _ in range(BATCH)]
    ex = llguidance.LLExecutor(num_threads=1)
    words = (vocab + 31) // 32

    def fill(mask):
        ex.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(rows)], mask.data_ptr(), words * 4, BATCH)

    def advance(tokens):
        for m, tok in zip(rows, tokens, strict=True):
            if not m.is_stopped():
                m.consume_token(tok)

    return {
        "version": importlib.metadata.version("llguidance"),
        "installed_mb": _installed_mb("llguidance"),
        "compile_ms": compile_ms,
        "mask_us_per_row": _walk(fill, advance, BATCH, vocab),
    }


def _xgrammar(tokenizer, vocab, eos, schema) -> dict:
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[eos])
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(schema, any_whitespace=False)
    compile_ms = (time.perf_counter() - t) * 1e3
    rows = [xgrammar.GrammarMatcher(compiled) for _ in range(BATCH)]

    def fill(mask):
        for i, m in enumerate(rows):
            m.fill_next_token_bitmask(mask, i)

    def advance(tokens):
        for m, tok in zip(rows, tokens, strict=True):
            if not m.is_terminated():
                m.accept_token(tok)

    return {
        "version": importlib.metadata.version("xgrammar"),
        # its dependencies this project lacks: triton (pulled in on x86-64 Linux) and apache-tvm-ffi
        "installed_mb": _installed_mb("xgrammar", "apache-tvm-ffi", "triton"),
        "compile_ms": compile_ms,
        "mask_us_per_row": _walk(fill, advance, BATCH, vocab),
    }


def _outlines(tokenizer, vocab, eos, schema) -> dict:
    import outlines_core
    from outlines_core import json_schema

    specials = set(tokenizer.all_special_ids)
    tokens: dict[str, list[int]] = {}
    for text, i in tokenizer.get_vocab().items():
        if i not in specials:
            tokens.setdefault(text, []).append(i)
    t = time.perf_counter()
    index = outlines_core.Index(
        json_schema.build_regex_from_schema(schema), outlines_core.Vocabulary(eos, tokens)
    )
    compile_ms = (time.perf_counter() - t) * 1e3
    rows = [outlines_core.Guide(index) for _ in range(BATCH)]
    words = (vocab + 31) // 32

    def fill(mask):
        for i, g in enumerate(rows):
            g.write_mask_into(mask[i].data_ptr(), words, 4)

    def advance(tokens):
        for g, tok in zip(rows, tokens, strict=True):
            if not g.is_finished():
                g.advance(tok)

    return {
        "version": importlib.metadata.version("outlines_core"),
        "installed_mb": _installed_mb("outlines_core"),
        "compile_ms": compile_ms,
        "mask_us_per_row": _walk(fill, advance, BATCH, vocab),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="default: a fresh `small` tiny checkpoint")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/structured.json"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = None
    ckpt = args.checkpoint
    if ckpt is None:
        tmp = tempfile.TemporaryDirectory()
        ckpt = make_tiny_checkpoint(Path(tmp.name) / "small", preset="small", llm="qwen2")
    results = {
        "engine": bench_engine(ckpt, args.rounds),
        "compile": bench_compile(ckpt),
        "mask_apply_alone": bench_apply(),
        "peers": peers(ckpt),
        "target": {"grammar_share_of_step_max": 0.10, "cached_compile_ms_max": 1.0},
        "setup": machine(
            checkpoint=str(args.checkpoint) if args.checkpoint else "tiny_checkpoint preset=small llm=qwen2",
            vocab=int(Checkpoint.open(ckpt).text_config["vocab_size"]),
            batch=BATCH,
            prompt_tokens=PROMPT_TOKENS,
            output_tokens=OUTPUT_TOKENS,
            schema="invoice_schema(50): 49 typed properties + an array of line objects",
            device="cpu",
            rounds=args.rounds,
        ),
    }
    write_results(args.out, results)
    e, c = results["engine"]["medians"]["json_schema"], results["compile"]
    print(f"grammar: {e['grammar_us_per_row']:.1f} us/row/step, {e['grammar_share_of_step']:.1%} of the step")
    print(f"compile: cold {c['cold_ms']:.2f} ms, cached {c['cached_ms']:.3f} ms")
    print("mask application alone:", results["mask_apply_alone"])
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
