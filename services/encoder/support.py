"""Whether the vision encoder can serve a checkpoint, decided before anything starts.

``check_checkpoint`` raises what loading would raise, through the function loading itself calls:
``plan_vision`` (the vision config, the attention backend for the device and dtype, the presence of
the vision and projector weights). No weight is read. What only the tensors can tell (a tensor that
does not fit the vision config) is still found when the encoder loads.
"""

from __future__ import annotations

from services.common.checkpoint import Checkpoint
from services.encoder.config import EncoderConfig
from services.encoder.vision_model import plan_vision


def check_checkpoint(ckpt: Checkpoint, config: EncoderConfig) -> None:
    """Return if the encoder configured by ``config`` can serve ``ckpt``; otherwise raise the
    ``FailedPrecondition`` or ``InvalidArgument`` that would refuse it at load, with its reason."""
    plan_vision(ckpt, config.device, config.dtype, config.attention)
