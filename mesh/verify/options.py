"""What ``verify`` runs (``VerifyOptions``), on what (``Setup``), and how strict it is (``Tolerances``).

Tolerances follow ARCHITECTURE.md, "Fidelity": in float32 on the CPU the mesh must reproduce the
reference exactly (embeddings within 1e-5, greedy tokens identical); elsewhere reduction orders differ
between our kernels and transformers', so fidelity is a tolerance: the relative error of the
embeddings, and the top-1 agreement over the generated positions (at each position the mesh generated,
does the reference model, given the same prefix, pick the same token?).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mesh.verify.images import MAX_IMAGES
from services.common.checkpoint import Checkpoint
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.limits import MAX_TILES_PER_IMAGE

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MAX_NEW_TOKENS = 4096


@dataclass(frozen=True)
class VerifyOptions:
    """The command line of ``verify``, validated. ``reference`` defaults to ``model``; ``max_num`` to the
    checkpoint's ``max_dynamic_patch``."""

    model: Path
    reference: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    images: int = 4
    max_new_tokens: int = 32
    max_num: int | None = None

    def validate(self) -> VerifyOptions:
        if self.device not in DEVICES:
            raise InvalidArgument(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not 1 <= self.images <= MAX_IMAGES:
            raise InvalidArgument(f"--images must be in 1..{MAX_IMAGES}, got {self.images}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise InvalidArgument(
                f"--max-new-tokens must be in 1..{MAX_NEW_TOKENS}, got {self.max_new_tokens}"
            )
        if self.max_num is not None and not 1 <= self.max_num <= MAX_TILES_PER_IMAGE:
            raise InvalidArgument(f"--max-num must be in 1..{MAX_TILES_PER_IMAGE}, got {self.max_num}")
        return self


@dataclass(frozen=True)
class Tolerances:
    """``exact``: embeddings within ``embeddings`` (max abs diff) and identical greedy tokens; otherwise
    embeddings within ``embeddings`` (relative error, Frobenius norm) and a top-1 agreement of at least
    ``agreement``."""

    exact: bool
    embeddings: float
    agreement: float

    def embeddings_text(self) -> str:
        kind = "max abs diff" if self.exact else "relative error"
        return f"{kind} <= {self.embeddings:g}"

    def tokens_text(self) -> str:
        if self.exact:
            return "greedy tokens identical to generate"
        return f"top-1 agreement >= {self.agreement:g}"


def tolerances_for(dtype: str, device: str) -> Tolerances:
    if dtype == "float32" and device == "cpu":
        return Tolerances(exact=True, embeddings=1e-5, agreement=1.0)
    if dtype == "float32":  # GPU float32: other kernels, other reduction orders
        return Tolerances(exact=False, embeddings=1e-3, agreement=0.99)
    return Tolerances(exact=False, embeddings=2e-2, agreement=0.9)  # bfloat16, float16


@dataclass(frozen=True)
class Setup:
    """The options resolved against the checkpoint and the machine."""

    checkpoint: Checkpoint
    reference: Path
    device: str  # cpu | cuda
    dtype: str  # float32 | bfloat16 | float16
    dtype_source: str  # where the dtype came from, for the report
    max_num: int
    tile_size: int
    tokens_per_tile: int
    tolerances: Tolerances


def resolve(options: VerifyOptions) -> Setup:
    """Open the checkpoint (a clear error for anything the services refuse) and pick device and dtype."""
    ckpt = Checkpoint.open(options.model)
    # the reference must be a native InternVL checkpoint too; its resolved directory (never a hub id)
    reference = Checkpoint.open(options.reference).path if options.reference is not None else ckpt.path

    # The services' own refusals, before any weight is read (these import torch: after the cheap checks).
    from services.decoder.models.registry import get_family
    from services.encoder.vision_model import VisionSpec

    get_family(ckpt.text_config).spec(ckpt.text_config)
    device = _device(options.device)
    dtype, source = _dtype(options.dtype, ckpt)
    spec = VisionSpec.from_checkpoint(ckpt)
    return Setup(
        checkpoint=ckpt,
        reference=reference,
        device=device,
        dtype=dtype,
        dtype_source=source,
        max_num=options.max_num if options.max_num is not None else ckpt.max_dynamic_patch(),
        tile_size=spec.image_size[0],
        tokens_per_tile=spec.tokens_per_tile,
        tolerances=tolerances_for(dtype, device),
    )


def _device(requested: str) -> str:
    import torch

    available = torch.cuda.is_available()
    if requested == "auto":
        return "cuda" if available else "cpu"
    if requested == "cuda" and not available:
        raise FailedPrecondition("--device cuda was asked for, but torch sees no CUDA device")
    return requested


def _dtype(requested: str, ckpt: Checkpoint) -> tuple[str, str]:
    """The dtype to run in and where it came from: ``--dtype``, else the checkpoint's, else float32."""
    if requested != "auto":
        return requested, "--dtype"
    for where, config in (("config.json", ckpt.config), ("config.json text_config", ckpt.text_config)):
        for key in ("dtype", "torch_dtype"):
            value = config.get(key)
            if value in DTYPES[1:]:
                return str(value), f"{where} {key}"
    return "float32", "default (the checkpoint names no dtype)"
