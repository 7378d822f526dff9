"""Model inputs for the demo task, built the way transformers' ``InternVLProcessor`` builds them.

The chat template renders the image part as ``<IMG_CONTEXT>``; that one token becomes ``<img>`` +
``<IMG_CONTEXT>`` x (``image_seq_length`` x tiles) + ``</img>``. Pixels come from the reference tiling
and the reference ``ToTensor`` + ``Normalize`` (``services.demo.reference``). Nothing here uses the
mesh's own preprocessing or prompt code: training and the ``generate`` baseline are independent of what
they are compared with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from services.demo.reference import dynamic_preprocess, to_tensor_normalize
from services.demo.task import Sample

MAX_TILES = 12


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # the token to learn at each position (the answers and their <|im_end|>), else -100
    tiles: np.ndarray  # (T, 3, 448, 448) float32, reference-normalised, thumbnail last when T > 1
    # (or, in stage 1 of training, the frozen vision tower's output for those tiles)


def messages_for(question: str) -> list[dict]:
    """The chat of one request: the image first, then the question (the order the README's example uses)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


class PromptCodec:
    def __init__(self, tokenizer, tokens_per_tile: int):
        self.tokenizer = tokenizer
        self.tokens_per_tile = tokens_per_tile  # the model config's image_seq_length
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
        image = [self.start_id] + [self.context_id] * (self.tokens_per_tile * num_tiles) + [self.end_id]
        return encode(before, add_special_tokens=False) + image + encode(after, add_special_tokens=False)

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer.encode(answer, add_special_tokens=False) + [self.eos_id]

    def next_turn_ids(self, question: str) -> list[int]:
        """What the chat template renders after an answer's <|im_end|>: the next user turn and the
        assistant's header (``\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n``)."""
        text = self.tokenizer.apply_chat_template(
            [{"role": "assistant", "content": "x"}, {"role": "user", "content": question}],
            tokenize=False,
            add_generation_prompt=True,
        )
        tail = text[text.index("x<|im_end|>") + len("x<|im_end|>") :]
        return self.tokenizer.encode(tail, add_special_tokens=False)

    def decode_answer(self, ids: list[int]) -> str:
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def reference_pixels(image: Image.Image, max_tiles: int = MAX_TILES) -> np.ndarray:
    """The reference tiles of ``image``, each ``ToTensor`` + ``Normalize``'d: (T, 3, 448, 448) float32."""
    tiles = dynamic_preprocess(image, 1, max_tiles, 448, use_thumbnail=True)
    return np.stack([to_tensor_normalize(t) for t in tiles])


def encode_sample(codec: PromptCodec, sample: Sample, more: list[tuple[str, str]] = ()) -> Encoded:
    """The sample's question and answer as the first turn; ``more`` (question, answer) pairs about the
    same image as further turns of the same conversation (training packs several questions per image:
    the image tokens are paid for once, and every answer is supervised)."""
    tiles = reference_pixels(sample.image)
    ids, labels = encode_turns(codec, len(tiles), [(sample.question, sample.answer), *more])
    return Encoded(ids, labels, tiles)


def encode_turns(codec: PromptCodec, num_tiles: int, turns: list[tuple[str, str]]) -> tuple[list, list]:
    """Token ids and labels of a conversation about one image of ``num_tiles`` tiles: the first
    (question, answer) with the image, the others as further turns."""
    ids = codec.prompt_ids(turns[0][0], num_tiles)
    labels = [-100] * len(ids)
    for k, (question, answer) in enumerate(turns):
        if k:
            turn = codec.next_turn_ids(question)
            ids += turn
            labels += [-100] * len(turn)
        answer_ids = codec.answer_ids(answer)
        ids += answer_ids
        labels += answer_ids
    return ids, labels


def collate(codec: PromptCodec, batch: list[Encoded]) -> dict[str, torch.Tensor]:
    """Right-padded teacher-forcing batch."""
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), codec.pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        attention[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
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
