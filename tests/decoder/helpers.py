"""What the decoder suite's tests share: the requests (``Case``, ``CASES``), the transformers reference,
helpers that build and drive an engine, and ``SlowTokenizer`` (a real tokenizer seen without its
Rust backend).

The reference is ``InternVLForConditionalGeneration.generate`` run one request at a time with the
request's ``pixel_values``; the engine gets ``get_image_features(pixel_values).pooler_output`` for the
same pixels (the encoder service is not under test here).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from services.decoder.config import CacheConfig, DecoderConfig, SchedulerConfig
from services.decoder.engine.llm_engine import LLMEngine
from services.decoder.engine.sampling_params import SamplingParams
from services.decoder.types import GenerateInput, GenerationEvent, ImageEmbedding

MAX_MODEL_LEN = 1024


def pixels(seed: int, tiles: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tiles, 3, 448, 448, generator=g)


@dataclass
class Case:
    """One request: messages, the pixel seeds of its images (content-part order), token limit."""

    messages: list
    image_seeds: list[int] = field(default_factory=list)
    max_tokens: int = 16
    namespace: str = ""


class Reference:
    """transformers' generate, one request at a time, memoised by case."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self._embeds: dict[int, torch.Tensor] = {}
        self._tokens: dict[str, list[int]] = {}

    def embedding(self, seed: int) -> torch.Tensor:
        if seed not in self._embeds:
            with torch.no_grad():
                feats = self.model.model.get_image_features(pixel_values=pixels(seed)).pooler_output
            self._embeds[seed] = feats.reshape(-1, feats.shape[-1])  # (tiles, 256, D) -> (tiles * 256, D)
        return self._embeds[seed]

    def images(self, case: Case) -> list[ImageEmbedding]:
        return [ImageEmbedding(self.embedding(s), 1, f"img-{s}") for s in case.image_seeds]

    def prompt_ids(self, case: Case) -> list[int]:
        text = self.tokenizer.apply_chat_template(case.messages, tokenize=False, add_generation_prompt=True)
        text = text.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * 256 + "</img>")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, case: Case) -> list[int]:
        key = repr((case.messages, case.image_seeds, case.max_tokens))
        if key not in self._tokens:
            ids = torch.tensor([self.prompt_ids(case)])
            kwargs = {}
            if case.image_seeds:
                kwargs["pixel_values"] = torch.cat([pixels(s) for s in case.image_seeds])
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=case.max_tokens,
                    do_sample=False,
                    **kwargs,
                )
            self._tokens[key] = out[0, ids.shape[1] :].tolist()
        return self._tokens[key]


def make_config(ckpt, **kw) -> DecoderConfig:
    cache = {"num_blocks": 256, "block_size": 16, **kw.pop("cache", {})}
    sched = {"max_model_len": MAX_MODEL_LEN, "max_num_batched_tokens": 512, **kw.pop("scheduler", {})}
    return DecoderConfig(
        model=str(ckpt), cache=CacheConfig(**cache), scheduler=SchedulerConfig(**sched), **kw
    )


def make_input(
    request_id: str, case: Case, reference: Reference, sampling: SamplingParams | None = None, **kw
):
    return GenerateInput(
        request_id=request_id,
        messages=case.messages,
        images=reference.images(case),
        sampling=sampling or SamplingParams(temperature=0.0),
        max_tokens=case.max_tokens,
        cache_namespace=case.namespace,
        **kw,
    )


def run(
    engine: LLMEngine, inputs: list[GenerateInput], arrivals: list[int] | None = None, max_steps: int = 5000
):
    """Drive the engine; request k is added before step ``arrivals[k]``. Returns id -> events."""
    arrivals = arrivals or [0] * len(inputs)
    events: dict[str, list[GenerationEvent]] = {i.request_id: [] for i in inputs}
    pending = sorted(zip(arrivals, range(len(inputs)), strict=True))
    step = 0
    while pending or engine.has_unfinished:
        while pending and pending[0][0] <= step:
            engine.add_request(engine.make_request(inputs[pending.pop(0)[1]]))
        for ev in engine.step():
            events[ev.request_id].append(ev)
        step += 1
        if step > max_steps:
            raise RuntimeError("engine did not finish")
    return events


def tokens_of(events: list[GenerationEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


def text_of(events: list[GenerationEvent]) -> str:
    return "".join(e.text for e in events)


def user(*parts) -> list[dict]:
    content = [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


CASES = [
    Case(user(None, "描述这张图片。"), [1], 20),
    Case(user("Hello, who are you?"), [], 12),
    Case(user(None, None, "Compare the two pictures."), [2, 3], 16),
    Case(user("写一首关于春天的诗"), [], 24),
    Case(
        [
            {"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "content": [{"type": "text", "text": "What is here?"}, {"type": "image"}]},
        ],
        [4],
        10,
    ),
    Case(user(None, "What color is the car?"), [5], 18),
    Case(
        [
            {"role": "user", "content": "Tell me a story."},
            {"role": "assistant", "content": "Once upon a time"},
            {"role": "user", "content": "Continue it, please."},
        ],
        [],
        14,
    ),
    Case(user(None, "今天天气怎么样？"), [1], 22),
]


class SlowTokenizer:
    """A real tokenizer seen as a Python tokenizer is (``decode``, its vocabulary and its added and
    special tokens, no Rust backend), counting the scans of its vocabulary and recording its decodes
    (their lengths, the threads that ran them)."""

    def __init__(self, tokenizer):
        self.inner = tokenizer
        self.vocab_scans = 0
        self.decoded: list[int] = []  # the length of every decode
        self.threads: set[str] = set()  # the names of the threads that decoded
        self.added_tokens_decoder = tokenizer.added_tokens_decoder
        self.all_special_ids = tokenizer.all_special_ids

    def get_vocab(self):
        self.vocab_scans += 1
        return self.inner.get_vocab()

    def decode(self, ids, **kw):
        self.decoded.append(len(ids))
        self.threads.add(threading.current_thread().name)
        return self.inner.decode(ids, **kw)
