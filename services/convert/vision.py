"""InternViT and the ``mlp1`` projector: original keys and config → transformers' InternVL layout.

InternViT-300M (LayerNorm, qkv bias) and InternViT-6B (RMSNorm, no qkv bias, qk-norm over the full
width) differ only in config flags that transformers' ``InternVLVisionConfig`` has too
(``norm_type``, ``attention_bias``, ``use_qk_norm``), so one mapping serves both. The one structural
change is the fused ``attn.qkv`` projection, whose rows are ``[q; k; v]`` each ``hidden_size`` wide,
split into ``q_proj`` / ``k_proj`` / ``v_proj``.
"""

from __future__ import annotations

import re
from typing import Any

from services.common.errors import FailedPrecondition

VISION_PREFIX = "vision_model."
PROJECTOR_PREFIX = "mlp1."

# Keys that exist in some original checkpoints but carry no weights the native model uses.
_IGNORED = re.compile(r"(^|\.)(rotary_emb\.inv_freq|attn\.dropout\..*)\Z")

_LAYER_RENAMES = (
    ("attn.proj.", "attention.projection_layer."),
    ("attn.q_norm.", "attention.q_norm."),
    ("attn.k_norm.", "attention.k_norm."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
)

_EMBEDDING_RENAMES = {
    "embeddings.class_embedding": "vision_tower.embeddings.cls_token",
    "embeddings.position_embedding": "vision_tower.embeddings.position_embeddings",
    "embeddings.patch_embedding.weight": "vision_tower.embeddings.patch_embeddings.projection.weight",
    "embeddings.patch_embedding.bias": "vision_tower.embeddings.patch_embeddings.projection.bias",
}

# mlp1 is nn.Sequential(LayerNorm, Linear, GELU, Linear): indices 0, 1, 3.
_PROJECTOR_RENAMES = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}

_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\Z")


def native_vision_config(vision_config: dict[str, Any]) -> dict[str, Any]:
    """``InternVisionConfig`` → ``InternVLVisionConfig`` keyword arguments."""
    norm_type = vision_config.get("norm_type", "rms_norm")
    if norm_type not in ("rms_norm", "layer_norm"):
        raise FailedPrecondition(
            f"vision_config.norm_type {norm_type!r} is not supported", reason="unsupported_layout"
        )
    dropout = float(vision_config.get("attention_dropout", 0.0))
    eps = float(vision_config.get("layer_norm_eps", 1e-6))
    if vision_config.get("qk_normalization") and eps != 1e-6:
        # transformers builds q_norm / k_norm with its default eps (1e-6); InternViT uses layer_norm_eps.
        raise FailedPrecondition(
            f"qk-norm with layer_norm_eps {eps} cannot be represented (transformers fixes it at 1e-6)",
            reason="unsupported_layout",
        )
    return {
        "hidden_size": vision_config["hidden_size"],
        "num_hidden_layers": vision_config["num_hidden_layers"],
        "num_attention_heads": vision_config["num_attention_heads"],
        "intermediate_size": vision_config["intermediate_size"],
        "hidden_act": vision_config.get("hidden_act", "gelu"),
        "layer_norm_eps": eps,
        "norm_type": norm_type,
        "attention_bias": bool(vision_config.get("qkv_bias", False)),
        "use_qk_norm": bool(vision_config.get("qk_normalization", False)),
        "image_size": vision_config["image_size"],
        "patch_size": vision_config["patch_size"],
        "num_channels": vision_config.get("num_channels", 3),
        "attention_dropout": dropout,
        "projection_dropout": dropout,
        "hidden_dropout_prob": float(vision_config.get("dropout", 0.0)),
        "initializer_range": float(vision_config.get("initializer_range", 0.02)),
        "use_absolute_position_embeddings": True,
        "use_mean_pooling": True,
        "use_mask_token": False,
    }


def convert_vision_tensor(name: str, tensor, hidden_size: int) -> list[tuple[str, Any]]:
    """One ``vision_model.*`` tensor → its native (name, tensor) pairs; [] for ignorable keys."""
    key = name[len(VISION_PREFIX) :]
    if _IGNORED.search(key):
        return []
    if key in _EMBEDDING_RENAMES:
        return [(_EMBEDDING_RENAMES[key], tensor)]
    m = _LAYER_KEY.match(key)
    if m is None:
        raise _unexpected(name)
    layer, rest = m.groups()
    out = f"vision_tower.encoder.layer.{layer}."
    if rest in ("ls1", "ls2"):
        return [(out + f"lambda_{rest[-1]}", tensor)]
    if rest.startswith("attn.qkv."):
        if tensor.shape[0] != 3 * hidden_size:
            raise FailedPrecondition(
                f"{name}: expected {3 * hidden_size} rows (q, k, v of width {hidden_size}), got {tuple(tensor.shape)}",
                reason="unsupported_layout",
            )
        suffix = rest[len("attn.qkv.") :]
        # Rows are [q; k; v], each hidden_size wide (InternAttention: qkv.reshape(B, N, 3, H, D)).
        q, k, v = tensor.split(hidden_size, dim=0)
        # clone: the three views share one storage, which safetensors refuses to write.
        return [
            (out + f"attention.{p}_proj.{suffix}", t.clone()) for p, t in zip("qkv", (q, k, v), strict=True)
        ]
    for old, new in _LAYER_RENAMES:
        if rest.startswith(old):
            return [(out + new + rest[len(old) :], tensor)]
    raise _unexpected(name)


def convert_projector_tensor(name: str, tensor) -> list[tuple[str, Any]]:
    index, _, param = name[len(PROJECTOR_PREFIX) :].partition(".")
    if index not in _PROJECTOR_RENAMES:
        raise _unexpected(name)
    return [(f"multi_modal_projector.{_PROJECTOR_RENAMES[index]}.{param}", tensor)]


def _unexpected(name: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"unexpected tensor {name!r} in the original checkpoint", reason="unsupported_layout"
    )
