"""Every configured checkpoint checked before anything starts: can its encoder and decoder serve it?

``internvl-mesh serve`` runs ``check_models`` before it starts Ray (``serve-grpc`` runs the encoder's
half), so a checkpoint that a service would refuse at load is refused in seconds, with the model's
name, its path and every reason, instead of by a deployment that Serve retries until it gives up.

The decisions are the services' own: ``services.encoder.support`` and ``services.decoder.support``
raise what their loaders raise, through the same functions, with the configs that the replicas build
from the rendered Serve config (``EncoderAppArgs.encoder_config``, ``DecoderAppArgs.decoder_config``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mesh.topology import MeshConfig, ServedModel, render_serve_config
from services.common.checkpoint import Checkpoint, support_refusals
from services.common.errors import FailedPrecondition
from services.decoder.config import DecoderAppArgs
from services.encoder.config import EncoderAppArgs

Check = Callable[[Checkpoint], None]


class CheckpointRefused(FailedPrecondition):
    """A configured checkpoint that a service cannot serve; the message names it and every reason."""

    reason = "checkpoint_refused"


def refusal_message(name: str, path: str | Path, reasons: list[str]) -> str:
    return f"model {name!r} ({path}) cannot be served:\n" + "\n".join(f"  {r}" for r in reasons)


def check_checkpoint(name: str, path: str | Path, checks: dict[str, Check]) -> None:
    """Raise ``CheckpointRefused`` where a service named in ``checks`` cannot serve the checkpoint."""
    reasons = support_refusals(path, checks)
    if reasons:
        raise CheckpointRefused(refusal_message(name, path, reasons))


def model_checks(model: ServedModel, args: dict[str, dict]) -> dict[str, Check]:
    """The encoder's and the decoder's checks of ``model``, with the configs its replicas would build
    (``args``: application name -> the args of the rendered Serve config)."""
    from services.common.serve_args import resolve_device
    from services.decoder import support as decoder_support
    from services.encoder import support as encoder_support

    device = resolve_device(model.device)
    encoder = EncoderAppArgs.model_validate(args[model.encoder_app])
    decoder = DecoderAppArgs.model_validate(args[model.decoder_app])
    return {
        "encoder": lambda ckpt: encoder_support.check_checkpoint(ckpt, encoder.encoder_config(device, "")),
        "decoder": lambda ckpt: decoder_support.check_checkpoint(
            ckpt, decoder.decoder_config(device.split(":")[0])
        ),
    }


def check_models(cfg: MeshConfig) -> None:
    """Raise ``CheckpointRefused`` naming every configured model that its encoder or decoder cannot
    serve (all of them, each with all its reasons); return if every model can be served."""
    args = {app["name"]: app["args"] for app in render_serve_config(cfg)["applications"]}
    messages = []
    for model in cfg.models:
        reasons = support_refusals(model.path, model_checks(model, args))
        if reasons:
            messages.append(refusal_message(model.name, model.path, reasons))
    if messages:
        raise CheckpointRefused("\n".join(messages))
