"""Model inputs for the demo task, built the way transformers' ``InternVLProcessor`` builds them.

The chat template renders the image part as ``<IMG_CONTEXT>``; that one token becomes ``<img>`` +
``<IMG_CONTEXT>`` x (256 x tiles) + ``</img>``. Pixels come from the reference tiling and the reference
``ToTensor`` + ``Normalize`` (``services.demo.reference``). Nothing here uses the mesh's own preprocessing
or prompt code: training and the ``generate`` baseline are independent of what they are compared with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from services.demo.reference import dynamic_preprocess, to_tensor_normalize
from services.demo.task import Sample

TOKENS_PER_TILE = 256
MAX_TILES = 12


@dataclass
class Encoded:
    prompt_ids: list[int]  # up to and including "<|im_start|>assistant\n"
    answer_ids: list[int]  # the answer and <|im_end|>
    tiles: np.ndarray  # (T, 3, 448, 448) float32, reference-normalised, thumbnail last when T > 1


def messages_for(question: str) -> list[dict]:
    """The chat of one request: the image first, then the question (the order the README's example uses)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


class PromptCodec:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.context_token = tokenizer.context_image_token
        self.context_id = tokenizer.convert_tokens_to_ids(self.context_token)
        self.start_id = tokenizer.convert_tokens_to_ids(tokenizer.start_image_token)
        self.end_id = tokenizer.convert_tokens_to_ids(tokenizer.end_image_token)
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def prompt_ids(self, question: str, num_tiles: int) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages_for(question), tokenize=False, add_generation_prompt=True
        )
        before, after = text.split(self.context_token, 1)
        if self.context_token in after:
            raise ValueError("one image per demo prompt")
        encode = self.tokenizer.encode
        image = [self.start_id] + [self.context_id] * (TOKENS_PER_TILE * num_tiles) + [self.end_id]
        return encode(before, add_special_tokens=False) + image + encode(after, add_special_tokens=False)

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer.encode(answer, add_special_tokens=False) + [self.eos_id]

    def decode_answer(self, ids: list[int]) -> str:
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def reference_pixels(sample: Sample, max_tiles: int = MAX_TILES) -> np.ndarray:
    tiles = dynamic_preprocess(sample.image, 1, max_tiles, 448, use_thumbnail=True)
    return np.stack([to_tensor_normalize(t) for t in tiles])


def encode_sample(codec: PromptCodec, sample: Sample) -> Encoded:
    tiles = reference_pixels(sample)
    return Encoded(codec.prompt_ids(sample.question, len(tiles)), codec.answer_ids(sample.answer), tiles)


def collate(codec: PromptCodec, batch: list[Encoded]) -> dict[str, torch.Tensor]:
    """Right-padded teacher-forcing batch; labels only on the answer (and its <|im_end|>)."""
    seqs = [e.prompt_ids + e.answer_ids for e in batch]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(batch), width), codec.pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (e, seq) in enumerate(zip(batch, seqs, strict=True)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        labels[i, len(e.prompt_ids) : len(seq)] = torch.tensor(e.answer_ids)
    pixels = torch.from_numpy(np.concatenate([e.tiles for e in batch]))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "pixel_values": pixels}


def answer_matches(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) bool: greedy decoding would produce exactly the labelled answer and stop.

    Position t predicts token t + 1; when the argmax equals the label at every answer position, greedy
    decoding from the prompt emits those tokens one by one, which is what ``generate`` would return.
    """
    pred = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    ok = (pred == target) | (target == -100)
    return ok.all(dim=1)
