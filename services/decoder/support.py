"""Whether the decoder can serve a checkpoint, decided before anything starts.

``check_checkpoint`` raises what loading would raise, through the functions loading itself calls:
``plan_model`` (the language-model family, its rope, the context length, the sliding window, the
tensor-parallel split and the attention backend), ``Checkpoint.require_component`` (the language-model
weights are there) and ``load_prompt_builder`` (the tokenizer, its image tokens and its chat template).
No weight is read, so it takes about as long as loading a tokenizer. What only the tensors or the
device's free memory can tell (a tensor of the wrong shape, a KV cache too small for one sequence) is
still found when the engine starts.
"""

from __future__ import annotations

from services.common.checkpoint import Checkpoint
from services.decoder.config import DecoderConfig
from services.decoder.engine.model_runner import plan_model
from services.decoder.prompting import load_prompt_builder


def check_checkpoint(ckpt: Checkpoint, config: DecoderConfig) -> None:
    """Return if the decoder configured by ``config`` can serve ``ckpt``; otherwise raise the
    ``FailedPrecondition`` or ``InvalidArgument`` that would refuse it at load, with its reason."""
    plan_model(config, ckpt.text_config)  # in the engine's order: the model, the tokenizer, the weights
    load_prompt_builder(ckpt)
    ckpt.require_component("language_model")
