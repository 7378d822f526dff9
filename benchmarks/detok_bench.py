"""Detokenisation per token, the previous detokenizer against this one, at a 2,000-token output; and
what a step's output processing costs the engine thread.

Tokenizers: the tiny checkpoint's byte-level BPE and InternVL2's Qwen2 tokenizer at its real ids (both
decoded through ``DecodeStream``), InternVL2's InternLM2 tokenizer as the converter rebuilds it (a
SentencePiece BPE with byte fallback: the window over the Rust decode). The output is the tokenizer
corpus (English and Chinese; InternLM2's tiny vocabulary spells most Chinese characters in bytes),
2,000 tokens of it, fed one token at a time, with no stop string and with two that never match.
Per-token figures are medians over ``--repeats`` runs of the mean over all tokens, the first 200 and
the last 200 (a cost that grew with the output would show there). The previous detokenizer is kept
below, as it was, to be measured against (``PreviousDetokenizer``).

Per step: ``--batch`` requests 1,000 tokens into their output each receive one token (medians over
20 steps). "previous" is
that step's detokenisation in the engine's step as it was; "inline" is ``OutputProcessor.process``
(what ``LLMEngine.step`` now runs); "engine thread" is what ``DecoderCore``'s engine thread now spends:
handing the outputs to the ``OutputWorker``, which detokenises them while the next step runs.

    python benchmarks/detok_bench.py [--tokens 2000] [--repeats 5] [--batch 256]
                                     [--out benchmarks/results/detok.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokenizers  # noqa: E402
import transformers  # noqa: E402

from services.common.tiny_checkpoint import corpus_text, train_tokenizer  # noqa: E402
from services.convert.tokenizer import build_internlm2_tokenizer  # noqa: E402
from services.decoder.engine.detokenizer import IncrementalDetokenizer, tokenizer_facts  # noqa: E402
from services.decoder.engine.output_processor import (  # noqa: E402
    EngineOutput,
    NewRequest,
    OutputProcessor,
    OutputWorker,
)
from tests.support.families import INTERNLM2_TOKENIZER, QWEN2_TOKENIZER  # noqa: E402
from tests.support.family_checkpoints import write_tokenizer  # noqa: E402

STOPS = ["</answer>", "\n\nUser:"]


# -- the previous detokenizer, as it was ------------------------------------------------------------
_byte_ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_byte_ids_lock = threading.Lock()


def byte_token_ids(tokenizer) -> frozenset[int]:
    """The ids of ``tokenizer``'s byte-fallback tokens (``<0xE4>``); its vocabulary is scanned once."""
    with _byte_ids_lock:
        found = _byte_ids.get(tokenizer)
        if found is None:
            found = frozenset(
                i
                for t, i in tokenizer.get_vocab().items()
                if len(t) == 6 and t.startswith("<0x") and t.endswith(">")
            )
            _byte_ids[tokenizer] = found
        return found


class PreviousDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop or [])
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # decoded text so far (complete characters only)
        self.emitted = 0  # characters of ``text`` already handed out
        self.stopped = False
        self._byte_ids = byte_token_ids(tokenizer)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; return the text that may be emitted now. Sets ``stopped`` on a stop string."""
        if self.stopped:
            return ""
        self.token_ids.extend(token_ids)
        if self.token_ids and self.token_ids[-1] in self._byte_ids:
            return self._take(len(self.text) - self._held_back())  # inside a byte run: wait for its end
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            checked_from = max(0, len(self.text) - self.max_stop_len + 1)
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            if self.stop and self._find_stop(checked_from):
                return self._take(len(self.text))
        return self._take(len(self.text) - self._held_back())

    def finish(self) -> str:
        """The rest of the text at the end of the request (not called after a stop string)."""
        if self.stopped:
            return ""
        complete = self._decode(self.token_ids)
        if complete.startswith(self.text[: self.emitted]):
            self.text = complete
        return self._take(len(self.text))

    def _find_stop(self, start: int) -> bool:
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.stopped = True
        return True

    def _held_back(self) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        for n in range(min(self.max_stop_len - 1, len(self.text) - self.emitted), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _take(self, end: int) -> str:
        end = max(end, self.emitted)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta


# -- measurements -----------------------------------------------------------------------------------
def load_tokenizers(root: Path) -> dict:
    from transformers import AutoTokenizer

    (root / "qwen2").mkdir()
    (root / "internlm2").mkdir()
    write_tokenizer(QWEN2_TOKENIZER, root / "qwen2")
    write_tokenizer(INTERNLM2_TOKENIZER, root / "internlm2")
    return {
        "tiny-bpe": train_tokenizer(),
        "qwen2": AutoTokenizer.from_pretrained(root / "qwen2"),
        "internlm2": build_internlm2_tokenizer(root / "internlm2"),
    }


def per_token_us(make, ids: list[int]) -> tuple[list[float], str]:
    """Microseconds of each ``add`` (the last entry: ``finish``) and the text."""
    d = make()
    times, text = [], []
    for t in ids:
        start = time.perf_counter_ns()
        text.append(d.add([t]))
        times.append((time.perf_counter_ns() - start) / 1000)
    start = time.perf_counter_ns()
    text.append("" if d.stopped else d.finish())
    times.append((time.perf_counter_ns() - start) / 1000)
    return times, "".join(text)


def measure_per_token(tokenizer, ids: list[int], repeats: int) -> dict:
    out = {}
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    for stop_name, stop in (("no_stop", None), ("two_stop_strings", STOPS)):
        for name, cls in (("previous", PreviousDetokenizer), ("current", IncrementalDetokenizer)):
            runs = []
            for _ in range(repeats):
                times, text = per_token_us(lambda cls=cls, stop=stop: cls(tokenizer, True, stop), ids)
                assert text == expected, f"{name}: the text differs from decode"
                runs.append(times)
            out[f"{name}_{stop_name}"] = {
                "us_per_token": statistics.median(statistics.fmean(r[:-1]) for r in runs),
                "us_per_token_first_200": statistics.median(statistics.fmean(r[:200]) for r in runs),
                "us_per_token_last_200": statistics.median(statistics.fmean(r[-201:-1]) for r in runs),
                "finish_us": statistics.median(r[-1] for r in runs),
            }
    start = time.perf_counter()
    for _ in range(repeats):
        tokenizer.decode(ids, skip_special_tokens=True)
    out["one_shot_decode_of_all_tokens_us"] = (time.perf_counter() - start) / repeats * 1e6
    return out


def measure_step(tokenizer, ids: list[int], batch: int, steps: int) -> dict:
    """One step of ``batch`` requests, each 1,000 tokens into its output, in milliseconds (medians
    over ``steps`` steps)."""
    warm, step_ids = ids[:1000], ids[1000 : 1000 + steps]
    previous = [PreviousDetokenizer(tokenizer, True, STOPS) for _ in range(batch)]
    processor = OutputProcessor(tokenizer)
    for i in range(batch):
        processor.add_request(NewRequest(f"r{i}", True, tuple(STOPS), 10, 0))
    for t in warm:  # token by token, as the engine feeds them
        for d in previous:
            d.add([t])
        processor.process([EngineOutput(f"r{i}", [t]) for i in range(batch)])
    prev_ms, inline_ms = [], []
    for t in step_ids:
        start = time.perf_counter()
        for d in previous:
            d.add([t])
        prev_ms.append((time.perf_counter() - start) * 1000)
        outputs = [EngineOutput(f"r{i}", [t]) for i in range(batch)]
        start = time.perf_counter()
        processor.process(outputs)
        inline_ms.append((time.perf_counter() - start) * 1000)
    return {
        "batch": batch,
        "previous_in_step_ms": statistics.median(prev_ms),
        "inline_ms": statistics.median(inline_ms),
        "engine_thread_ms": measure_handover(tokenizer, step_ids, batch),
    }


def measure_handover(tokenizer, steps: list[int], batch: int) -> float:
    """Median milliseconds the engine thread spends handing one step's outputs to the worker."""
    done = threading.Event()
    expected = batch * len(steps)
    delivered = [0]

    def deliver(event) -> None:
        delivered[0] += 1
        if delivered[0] == expected:
            done.set()

    worker = OutputWorker(OutputProcessor(tokenizer), deliver, stop=lambda rid: None)
    try:
        for i in range(batch):
            worker.add_request(NewRequest(f"r{i}", True, tuple(STOPS), 10, 0))
        handover = []
        for t in steps:
            outputs = [EngineOutput(f"r{i}", [t]) for i in range(batch)]
            start = time.perf_counter()
            worker.put(outputs)
            handover.append((time.perf_counter() - start) * 1000)
            time.sleep(0.02)  # the next step
        done.wait(60)
    finally:
        worker.close()
    return statistics.median(handover)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/detok.json"))
    args = ap.parse_args()
    results: dict = {"per_token": {}, "per_step": {}}
    with tempfile.TemporaryDirectory() as tmp:
        found = load_tokenizers(Path(tmp))
        for name, tokenizer in found.items():
            ids = tokenizer(corpus_text(), add_special_tokens=False)["input_ids"][: args.tokens]
            assert len(ids) == args.tokens, f"{name}: the corpus has {len(ids)} tokens"
            source = "DecodeStream" if tokenizer_facts(tokenizer).backend is not None else "window"
            results["per_token"][name] = {"source": source, **measure_per_token(tokenizer, ids, args.repeats)}
            results["per_step"][name] = measure_step(tokenizer, ids, args.batch, steps=20)
            print(
                name, json.dumps(results["per_token"][name], indent=1), results["per_step"][name], flush=True
            )
    results["setup"] = {
        "tokens": args.tokens,
        "repeats": args.repeats,
        "stop_strings": STOPS,
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
