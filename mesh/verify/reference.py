"""The reference side of ``verify``: OpenGVLab's preprocessing and transformers' InternVL classes.

The monolith of ARCHITECTURE.md ("Fidelity"): the reference ``load_image`` (``services.demo.reference``,
an independent transcription that shares no code with ``services.preprocess``), the checkpoint's chat
template through ``AutoTokenizer`` with each image part expanded as transformers' ``InternVLProcessor``
expands it, and ``InternVLForConditionalGeneration`` for features and greedy tokens, one request at a
time. A checkpoint saying ``ps_version`` ``v1`` (converted InternVL 1.5) gets OpenGVLab's v1 pixel
shuffle in place of transformers' (which implements v2 only).
"""

from __future__ import annotations

import gc
import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.common.errors import FailedPrecondition
from services.demo.reference import reference_load_image


def reference_pixels(data: bytes, max_num: int, tile_size: int) -> np.ndarray:
    """``load_image``: the reference tiles of ``data``, normalised: (tiles, 3, S, S) float32."""
    return reference_load_image(data, input_size=tile_size, max_num=max_num)


def opengvlab_pixel_shuffle(
    x: torch.Tensor, scale_factor: float = 0.5, ps_version: str = "v1"
) -> torch.Tensor:
    """``InternVLChatModel.pixel_shuffle`` of OpenGVLab's ``modeling_internvl_chat.py``."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if ps_version != "v1":  # v1 leaves the grid transposed
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


def require_chat_template(path: Path) -> None:
    """Refuse, before any model is loaded, a reference whose tokenizer has no chat template: the
    reference renders prompts with ``apply_chat_template``, as transformers does."""
    from transformers import AutoTokenizer

    try:
        template = AutoTokenizer.from_pretrained(path).chat_template
    except Exception as exc:  # transformers raises many unrelated types for a bad tokenizer
        raise FailedPrecondition(f"transformers cannot load the tokenizer of {path}: {exc}") from exc
    if not template:
        raise FailedPrecondition(
            f"the tokenizer of {path} has no chat template, so transformers cannot render the reference "
            "prompts; pass --reference a checkpoint whose tokenizer has one (e.g. the official -hf release)"
        )


class ReferenceModel:
    """transformers' ``InternVLForConditionalGeneration`` of a checkpoint, in ``dtype`` on ``device``."""

    def __init__(self, path: Path, dtype: str, device: str):
        from transformers import AutoTokenizer, InternVLForConditionalGeneration

        try:
            model = InternVLForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype))
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # transformers raises many unrelated types for a bad checkpoint
            raise FailedPrecondition(f"transformers cannot load the reference {path}: {exc}") from exc
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        config = json.loads((Path(path) / "config.json").read_text("utf-8"))
        if config.get("ps_version", "v2") == "v1":
            self.model.model.pixel_shuffle = partial(opengvlab_pixel_shuffle, ps_version="v1")
        self.tokens_per_tile = int(self.model.config.image_seq_length)
        tok = self.tokenizer
        self.context_token = getattr(tok, "context_image_token", None) or "<IMG_CONTEXT>"
        self.start_token = getattr(tok, "start_image_token", None) or "<img>"
        self.end_token = getattr(tok, "end_image_token", None) or "</img>"

    def close(self) -> None:
        """Release the weights (the next phase may need the device's memory)."""
        del self.model
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _pixels(self, pixels: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(pixels).to(self.device, self.model.dtype)  # (tiles, 3, S, S)

    @torch.inference_mode()
    def embeddings(self, pixels: np.ndarray) -> torch.Tensor:
        """``get_image_features(pixel_values).pooler_output``: (tiles, tokens_per_tile, D) float32 on the CPU."""
        out = self.model.get_image_features(pixel_values=self._pixels(pixels)).pooler_output
        return out.float().cpu()

    def prompt_ids(self, messages: list[dict[str, Any]], image_tiles: list[int]) -> list[int]:
        """The chat template's text with the k-th image part expanded to ``<img>`` + context tokens x
        (tokens per tile x tiles) + ``</img>``, tokenized as ``InternVLProcessor`` tokenizes it."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        pieces = text.split(self.context_token)
        if len(pieces) != len(image_tiles) + 1:
            raise FailedPrecondition(
                f"the reference chat template rendered {len(pieces) - 1} image placeholders "
                f"({self.context_token!r}) for {len(image_tiles)} images"
            )
        expanded = pieces[0]
        for tiles, rest in zip(image_tiles, pieces[1:], strict=True):
            image = self.context_token * (self.tokens_per_tile * tiles)
            expanded += f"{self.start_token}{image}{self.end_token}{rest}"
        return list(self.tokenizer(expanded)["input_ids"])

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], pixels: np.ndarray, max_new_tokens: int) -> list[int]:
        """Greedy ``generate`` of one request; the new token ids (a final end-of-sequence included)."""
        ids = torch.tensor([prompt_ids], device=self.device)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=self._pixels(pixels),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.0,
        )
        return out[0, len(prompt_ids) :].tolist()

    @torch.inference_mode()
    def top1(self, prompt_ids: list[int], pixels: np.ndarray, continuation: list[int]) -> list[int]:
        """Teacher-forced: the reference's greedy choice at each position of ``continuation``, given the
        prompt and the continuation's tokens before it (one forward)."""
        if not continuation:
            return []
        ids = torch.tensor([prompt_ids + continuation[:-1]], device=self.device)
        logits = self.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=self._pixels(pixels),
            logits_to_keep=len(continuation),
        ).logits  # (1, len(continuation), vocab): the predictions of the continuation's tokens
        return logits[0].argmax(-1).tolist()
