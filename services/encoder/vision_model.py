"""Our InternViT + pixel shuffle + projector, loaded from a native checkpoint's canonical weights.

Only the vision tower and the projector are read (``Checkpoint.load_component``); the language model
is never touched. The modules follow transformers' ``InternVLVisionModel`` and
``InternVLMultiModalProjector`` operation for operation, so fp32 results match
``InternVLModel.get_image_features`` to rounding, with three differences that are ours:

- q, k and v are one fused linear (one GEMM instead of three), built from the checkpoint's three at load;
- attention goes through our backend registry (SDPA everywhere, flash-attn on CUDA);
- pixel shuffle honours the checkpoint's ``ps_version`` (transformers implements v2 only).

The InternViT-6B settings transformers supports are honoured: ``norm_type`` rms_norm, ``use_qk_norm``
(RMSNorm over the full width of q and k), ``attention_bias`` false.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.common.checkpoint import Checkpoint
from services.common.errors import FailedPrecondition, InvalidArgument
from services.encoder.attention import AttentionBackend, resolve_backend
from services.encoder.pixel_shuffle import PS_VERSIONS, pixel_shuffle
from services.preprocess.normalize import normalize_tiles

# transformers' InternVLVisionRMSNorm default, used by its q/k norms whatever layer_norm_eps says.
QK_NORM_EPS = 1e-6

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # erf form, transformers' GELUActivation
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


@dataclass(frozen=True)
class VisionSpec:
    """The facts of a checkpoint's vision side, read from its config.json."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    norm_type: str
    layer_norm_eps: float
    use_qk_norm: bool
    attention_bias: bool
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    use_mean_pooling: bool
    feature_layer: int
    downsample_ratio: float
    ps_version: str
    projector_act: str
    text_hidden_size: int

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> VisionSpec:
        vc, cfg = ckpt.vision_config, ckpt.config
        feature_layer = cfg.get("vision_feature_layer", -1)
        if not isinstance(feature_layer, int):
            raise FailedPrecondition(f"vision_feature_layer must be one integer, got {feature_layer!r}")
        if cfg.get("vision_feature_select_strategy", "default") != "default":
            raise FailedPrecondition("only vision_feature_select_strategy 'default' (drop CLS) is supported")
        spec = cls(
            hidden_size=int(vc.get("hidden_size", 1024)),
            num_layers=int(vc.get("num_hidden_layers", 24)),
            num_heads=int(vc.get("num_attention_heads", 16)),
            intermediate_size=int(vc.get("intermediate_size", 4096)),
            hidden_act=str(vc.get("hidden_act", "gelu")),
            norm_type=str(vc.get("norm_type", "layer_norm")),
            layer_norm_eps=float(vc.get("layer_norm_eps", 1e-6)),
            use_qk_norm=bool(vc.get("use_qk_norm", False)),
            attention_bias=bool(vc.get("attention_bias", False)),
            image_size=_pair(vc.get("image_size", 448)),
            patch_size=_pair(vc.get("patch_size", 14)),
            use_mean_pooling=bool(vc.get("use_mean_pooling", True)),
            feature_layer=feature_layer,
            downsample_ratio=float(cfg.get("downsample_ratio", 0.5)),
            ps_version=ckpt.ps_version,
            projector_act=str(cfg.get("projector_hidden_act", "gelu")),
            text_hidden_size=int(ckpt.text_config["hidden_size"]),
        )
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise FailedPrecondition(
                f"hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads"
            )
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise FailedPrecondition(f"unsupported vision norm_type {self.norm_type!r}")
        for act in (self.hidden_act, self.projector_act):
            if act not in _ACTIVATIONS:
                raise FailedPrecondition(f"unsupported activation {act!r}; one of {sorted(_ACTIVATIONS)}")
        if self.ps_version not in PS_VERSIONS:
            raise FailedPrecondition(f"ps_version must be one of {PS_VERSIONS}, got {self.ps_version!r}")
        if not -(self.num_layers + 1) <= self.feature_layer <= self.num_layers:
            raise FailedPrecondition(f"vision_feature_layer {self.feature_layer} is out of range")
        grid = self.grid
        factor = round(1 / self.downsample_ratio)
        if grid[0] % factor or grid[1] % factor:
            raise FailedPrecondition(f"patch grid {grid} does not divide by the downsample factor {factor}")

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def tokens_per_tile(self) -> int:
        h, w = self.grid
        return int(h * w * self.downsample_ratio**2)

    @property
    def shuffled_dim(self) -> int:
        return self.hidden_size * round(1 / self.downsample_ratio) ** 2

    def digest(self) -> str:
        """Names everything here that changes the numbers: part of the cache identity."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


class RMSNorm(nn.Module):
    """InternViT-6B's norm: computed in float32, scaled in the input dtype (as transformers does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _norm(spec: VisionSpec, dim: int) -> nn.Module:
    if spec.norm_type == "rms_norm":
        return RMSNorm(dim, spec.layer_norm_eps)
    return nn.LayerNorm(dim, eps=spec.layer_norm_eps)


class PatchEmbeddings(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.projection = nn.Conv2d(3, spec.hidden_size, kernel_size=spec.patch_size, stride=spec.patch_size)


class Embeddings(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        h, w = spec.grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, h * w + 1, spec.hidden_size))
        self.patch_embeddings = PatchEmbeddings(spec)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b = pixels.shape[0]
        x = self.patch_embeddings.projection(pixels)  # (B, 3, S, S) -> (B, C, S/p, S/p)
        x = x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C), row-major patches
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)  # (B, 1 + h*w, C)
        return x + self.position_embeddings


class Attention(nn.Module):
    def __init__(self, spec: VisionSpec, backend: AttentionBackend):
        super().__init__()
        c = spec.hidden_size
        self.num_heads = spec.num_heads
        self.head_dim = c // spec.num_heads
        self.scale = self.head_dim**-0.5
        self.backend = backend
        self.qkv = nn.Linear(c, 3 * c, bias=spec.attention_bias)  # fused from q_proj, k_proj, v_proj
        self.projection_layer = nn.Linear(c, c)
        self.q_norm = RMSNorm(c, QK_NORM_EPS) if spec.use_qk_norm else nn.Identity()
        self.k_norm = RMSNorm(c, QK_NORM_EPS) if spec.use_qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, L, 3C) -> 3 x (B, L, C)
        q, k = self.q_norm(q), self.k_norm(k)  # qk-norm spans all heads (InternViT-6B)
        shape = (b, n, self.num_heads, self.head_dim)
        out = self.backend.attend(q.reshape(shape), k.reshape(shape), v.reshape(shape), self.scale)
        return self.projection_layer(out.reshape(b, n, c))  # (B, L, H, Dh) -> (B, L, C)


class Mlp(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.fc1 = nn.Linear(spec.hidden_size, spec.intermediate_size)
        self.fc2 = nn.Linear(spec.intermediate_size, spec.hidden_size)
        self.act = _ACTIVATIONS[spec.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with layer scale (lambda_1, lambda_2)."""

    def __init__(self, spec: VisionSpec, backend: AttentionBackend):
        super().__init__()
        self.attention = Attention(spec, backend)
        self.mlp = Mlp(spec)
        self.layernorm_before = _norm(spec, spec.hidden_size)
        self.layernorm_after = _norm(spec, spec.hidden_size)
        self.lambda_1 = nn.Parameter(torch.ones(spec.hidden_size))
        self.lambda_2 = nn.Parameter(torch.ones(spec.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lambda_1 * self.attention(self.layernorm_before(x)) + x
        return self.lambda_2 * self.mlp(self.layernorm_after(x)) + x


class Encoder(nn.Module):
    def __init__(self, spec: VisionSpec, backend: AttentionBackend):
        super().__init__()
        self.layer = nn.ModuleList(Block(spec, backend) for _ in range(spec.num_layers))


class VisionTower(nn.Module):
    """InternViT. Parameter names are the checkpoint's canonical ones (``embeddings.cls_token``, ...)."""

    def __init__(self, spec: VisionSpec, backend: AttentionBackend):
        super().__init__()
        self.spec = spec
        self.embeddings = Embeddings(spec)
        self.encoder = Encoder(spec, backend)
        # Without mean pooling transformers applies a final LayerNorm to last_hidden_state.
        self.layernorm = (
            nn.Identity()
            if spec.use_mean_pooling
            else nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, 1 + h*w, C) features of the configured layer."""
        x = self.embeddings(pixels)
        layers = self.encoder.layer
        if self.spec.feature_layer == -1:
            for block in layers:
                x = block(x)
            return self.layernorm(x)
        # hidden_states = (embeddings, block 1, ..., block N): stop after the one asked for.
        stop = self.spec.feature_layer % (len(layers) + 1)
        for block in layers[:stop]:
            x = block(x)
        return x


class Projector(nn.Module):
    """``mlp1``: LayerNorm(4C) -> Linear(4C, D) -> GELU -> Linear(D, D)."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.layer_norm = nn.LayerNorm(spec.shuffled_dim)
        self.linear_1 = nn.Linear(spec.shuffled_dim, spec.text_hidden_size)
        self.linear_2 = nn.Linear(spec.text_hidden_size, spec.text_hidden_size)
        self.act = _ACTIVATIONS[spec.projector_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


class VisionEncoderModule(nn.Module):
    """uint8 tiles in, LLM-ready embeddings out."""

    def __init__(self, spec: VisionSpec, backend: AttentionBackend):
        super().__init__()
        self.spec = spec
        self.vision = VisionTower(spec, backend)
        self.projector = Projector(spec)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, tokens_per_tile, D)."""
        feats = self.vision(pixels)[:, 1:, :]  # (B, 1 + h*w, C) -> (B, h*w, C): drop CLS
        h, w = self.spec.grid
        feats = feats.reshape(feats.shape[0], h, w, -1)  # (B, h*w, C) -> (B, h, w, C)
        tokens = pixel_shuffle(feats, self.spec.downsample_ratio, self.spec.ps_version)  # (B, hw/4, 4C)
        return self.projector(tokens)  # (B, hw/4, 4C) -> (B, hw/4, D)


def fuse_qkv(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Replace each layer's q/k/v projections by one ``qkv`` linear (rows q, then k, then v)."""
    out = dict(state)
    for i in range(num_layers):
        p = f"encoder.layer.{i}.attention."
        for kind in ("weight", "bias"):
            parts = [out.pop(f"{p}{x}_proj.{kind}", None) for x in "qkv"]
            if all(t is None for t in parts):
                continue
            if any(t is None for t in parts):
                raise FailedPrecondition(f"layer {i} has only some of q/k/v {kind}s")
            out[f"{p}qkv.{kind}"] = torch.cat(parts, dim=0)  # 3 x (C, ...) -> (3C, ...)
    return out


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype: the configured one, or bf16 on CUDA (fp16 without bf16) and fp32 on CPU."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@dataclass(frozen=True)
class VisionPlan:
    """What a checkpoint's config and the encoder's settings make of the vision side."""

    spec: VisionSpec
    dtype: torch.dtype
    backend: AttentionBackend


def plan_vision(ckpt: Checkpoint, device: str | torch.device, dtype: str, attention: str) -> VisionPlan:
    """The encoder ``VisionEncoder.load`` will build, or the ``FailedPrecondition`` / ``InvalidArgument``
    that refuses it: the vision config, the attention backend on this device and dtype, and the presence
    of the vision and projector weights. Reads no weight; ``services.encoder.support`` calls it before
    anything starts, so a checkpoint is refused for the same reason there and at load."""
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        spec = VisionSpec.from_checkpoint(ckpt)
    except KeyError as exc:
        raise FailedPrecondition(
            f"the config of this checkpoint lacks {exc.args[0]!r}", reason="checkpoint_config_invalid"
        ) from exc
    backend = resolve_backend(attention, device, torch_dtype)
    ckpt.require_component("vision")
    ckpt.require_component("projector")
    return VisionPlan(spec, torch_dtype, backend)


def tile_bucket(n: int) -> int:
    """The batch size ``n`` tiles are padded to with ``staged_io``: 1, 2, 4, 8, then a multiple of 8."""
    return 1 << max(n - 1, 0).bit_length() if n <= 8 else -(-n // 8) * 8


class VisionEncoder:
    """The loaded encoder on its device: ``encode(uint8 tiles) -> embeddings`` plus the facts around it.

    Not thread-safe by itself: the batcher runs every forward on its one worker thread.
    """

    def __init__(
        self,
        module: VisionEncoderModule,
        device: torch.device,
        dtype: torch.dtype,
        backend: str,
        staged_io: bool = False,
    ):
        self.module = module
        self.spec = module.spec
        self.device = device
        self.dtype = dtype
        self.backend = backend
        self.staged_io = staged_io  # ``EncoderSettings.staged_io``

    @classmethod
    def load(
        cls,
        ckpt: Checkpoint,
        device: str | torch.device = "cpu",
        dtype: str = "auto",
        attention: str = "auto",
        staged_io: bool = False,
    ) -> VisionEncoder:
        device = torch.device(device)
        plan = plan_vision(ckpt, device, dtype, attention)
        spec, torch_dtype, backend = plan.spec, plan.dtype, plan.backend
        with torch.device("meta"):
            module = VisionEncoderModule(spec, backend)
        vision = fuse_qkv(ckpt.load_component("vision", dtype=torch_dtype), spec.num_layers)
        projector = ckpt.load_component("projector", dtype=torch_dtype)
        state = {f"vision.{k}": v for k, v in vision.items()}
        state.update({f"projector.{k}": v for k, v in projector.items()})
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise FailedPrecondition(
                f"checkpoint {ckpt.path} does not fit its vision config: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}",
                reason="checkpoint_incomplete",
            )
        module = module.to(device=device).eval().requires_grad_(False)
        return cls(module, device, torch_dtype, backend.name, staged_io)

    @property
    def tokens_per_tile(self) -> int:
        return self.spec.tokens_per_tile

    @property
    def dim(self) -> int:
        return self.spec.text_hidden_size

    @property
    def tile_size(self) -> int:
        return self.spec.image_size[0]

    def check_tiles(self, tiles: torch.Tensor) -> None:
        s = self.spec.image_size
        if tiles.dtype != torch.uint8 or tiles.dim() != 4 or tuple(tiles.shape[1:]) != (s[0], s[1], 3):
            raise InvalidArgument(
                f"tiles must be uint8 (N, {s[0]}, {s[1]}, 3), got {tiles.dtype} {tuple(tiles.shape)}"
            )

    @torch.inference_mode()
    def encode(self, tiles: torch.Tensor) -> torch.Tensor:
        """(N, S, S, 3) uint8 tiles (any device) -> (N, tokens_per_tile, D) in ``dtype`` on the CPU."""
        self.check_tiles(tiles)
        if self.staged_io:
            return self._encode_staged(tiles)
        tiles = tiles.to(self.device, non_blocking=True)
        pixels = normalize_tiles(tiles, self.dtype)  # (N, S, S, 3) uint8 -> (N, 3, S, S), on the device
        out = self.module(pixels)  # (N, 3, S, S) -> (N, tokens_per_tile, D)
        return out.to("cpu")

    def _encode_staged(self, tiles: torch.Tensor) -> torch.Tensor:
        """``encode`` with ``staged_io``: the batch padded to its bucket with blank tiles (each tile is
        encoded on its own, so padding changes no real tile's embedding), host tiles copied through a
        page-locked buffer without blocking, the embeddings copied back into another and waited for
        once. On the CPU there is no copy: only the bucket padding applies."""
        n = tiles.shape[0]
        bucket = tile_bucket(n)
        cuda = self.device.type == "cuda"
        if cuda and tiles.device.type == "cpu":
            staged = torch.empty((bucket, *tiles.shape[1:]), dtype=torch.uint8, pin_memory=True)
            staged[:n].copy_(tiles)
            staged[n:].zero_()
            tiles = staged.to(self.device, non_blocking=True)  # (bucket, S, S, 3)
        else:
            tiles = tiles.to(self.device)
            if bucket > n:
                tiles = torch.cat((tiles, tiles.new_zeros((bucket - n, *tiles.shape[1:]))))
        out = self.module(normalize_tiles(tiles, self.dtype))[:n]  # (n, tokens_per_tile, D)
        if not cuda:
            return out
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()  # the one wait: the embeddings are home
        return host
