"""Language-model families: how each reads its config and names its weights.

Every supported family is a pre-norm decoder with RMSNorm, RoPE, GQA attention and a SwiGLU MLP; they
differ in biases, in fused checkpoint tensors (Phi-3 stores ``qkv_proj`` and ``gate_up_proj``), in
per-head q/k norms (Qwen3) and in rope variants. A family names, for each canonical per-layer weight
(q, k, v, o, gate, up, down + norms), where it is stored (``Source``: a tensor, or a row range of a
fused one); the layers take their tensor-parallel shard of that part, so a rank reads only its own
slice of the files. Adding a family is adding a class here. InternLM2 checkpoints arrive converted to
the Llama layout.

Rope variants that change with the sequence length are served in the form they take for short
sequences, which is a static rope: dynamic NTK is the plain rope up to ``max_position_embeddings``,
longrope uses its short factors (and its attention scaling) up to ``original_max_position_embeddings``.
``ModelSpec.rope_exact_len`` records that length; the engine never serves a longer context.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch

from services.common.errors import FailedPrecondition

STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Rope types that change with the sequence length -> the config key bounding their static form.
SHORT_FORM_ROPE_TYPES = {
    "dynamic": "max_position_embeddings",
    "longrope": "original_max_position_embeddings",
}
MOE = "mixture-of-experts layers are not supported by the decoder"
REFUSED_MODEL_TYPES = {"qwen3_moe": MOE, "gpt_oss": MOE}


@dataclass
class Rope:
    """The static rope the decoder serves: inverse frequencies and the cos/sin scaling."""

    rope_type: str
    inv_freq: torch.Tensor
    attention_scaling: float
    rotary_dim: int
    exact_len: int | None = None  # set for SHORT_FORM_ROPE_TYPES: the longest sequence served exactly
    exact_len_key: str | None = None  # the config key ``exact_len`` was read from


@dataclass(frozen=True)
class Source:
    """Where one canonical weight is stored: the language model's tensor ``key``, or only its rows
    ``[start, stop)`` where the checkpoint fuses several weights into one (Phi-3's ``qkv_proj``)."""

    key: str
    rows: tuple[int, int] | None = None


# The MLP's gate activation: SiLU, under either of its names.
SWIGLU_ACTIVATIONS = ("silu", "swish")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


@dataclass
class ModelSpec:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    rope: Rope
    sliding_window: int | None = None
    qk_norm: bool = False  # RMSNorm over each head's q and k, after the projection, before rope

    def context_bound(self) -> tuple[int, str]:
        """The longest sequence served exactly, and why it is that."""
        positions = self.max_position_embeddings
        exact = self.rope.exact_len
        if exact is None:
            return positions, f"the model's {positions} positions"
        why = (
            f"the model's {self.rope.rope_type!r} rope changes with the sequence length and equals the "
            f"static rope the decoder serves only up to {self.rope.exact_len_key}={exact}"
        )
        if exact < positions:
            why += f" (the model declares {positions} positions)"
        return min(exact, positions), why


def _rope(text_config: dict[str, Any], head_dim: int) -> Rope:
    params = dict(text_config.get("rope_parameters") or {})
    legacy = text_config.get("rope_scaling") or {}
    params = {**legacy, **params}
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    theta = float(params.get("rope_theta", text_config.get("rope_theta", 10000.0)))
    partial = float(params.get("partial_rotary_factor", text_config.get("partial_rotary_factor", 1.0)))
    rotary_dim = int(head_dim * partial)
    if rope_type == "default":
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
        return Rope(rope_type, inv_freq, 1.0, rotary_dim)
    if rope_type not in STATIC_ROPE_TYPES and rope_type not in SHORT_FORM_ROPE_TYPES:
        raise FailedPrecondition(
            f"rope type {rope_type!r} is not supported; supported: "
            f"{', '.join(STATIC_ROPE_TYPES + tuple(SHORT_FORM_ROPE_TYPES))}"
        )
    from transformers import CONFIG_MAPPING
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = CONFIG_MAPPING[text_config["model_type"]](**text_config)
    # Without a sequence length, transformers' init functions give the short-sequence form: the plain
    # inverse frequencies for dynamic NTK, the short factors (and the attention factor) for longrope.
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    rope = Rope(rope_type, inv_freq, float(scaling), rotary_dim)
    key = SHORT_FORM_ROPE_TYPES.get(rope_type)
    if key is not None:
        standard = hf_config.rope_parameters  # standardised: longrope's original length sits here
        rope.exact_len = int(standard[key] if key in standard else getattr(hf_config, key))
        rope.exact_len_key = key
    return rope


class Family:
    """Defaults shared by Qwen2 and Llama; subclasses override what differs."""

    name = "llama"
    qk_norm = False  # per-head RMSNorm of q and k (``self_attn.q_norm`` / ``k_norm`` in the checkpoint)

    def spec(self, c: dict[str, Any]) -> ModelSpec:
        activation = c.get("hidden_act", "silu")
        if activation not in SWIGLU_ACTIVATIONS:
            raise FailedPrecondition(
                f"hidden_act {activation!r} is not supported: the decoder's MLP is SwiGLU "
                f"({' / '.join(SWIGLU_ACTIVATIONS)})"
            )
        heads = int(c["num_attention_heads"])
        head_dim = self.head_dim(c)
        return ModelSpec(
            family=self.name,
            vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]),
            num_layers=int(c["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            intermediate_size=int(c["intermediate_size"]),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
            qkv_bias=self.qkv_bias(c),
            o_bias=bool(c.get("attention_bias", False)),
            mlp_bias=bool(c.get("mlp_bias", False)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            rope=_rope(c, head_dim),
            sliding_window=self.sliding_window(c),
            qk_norm=self.qk_norm,
        )

    def head_dim(self, c: dict[str, Any]) -> int:
        return int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])

    def qkv_bias(self, c: dict[str, Any]) -> bool:
        return bool(c.get("attention_bias", False))

    def sliding_window(self, c: dict[str, Any]) -> int | None:
        return None

    def layer_sources(self, keys: Collection[str], i: int, spec: ModelSpec) -> dict[str, Source]:
        """Where layer ``i``'s canonical weights are stored, by canonical name: q/k/v/o/gate/up/down
        (weight, bias where ``keys``, the language model's stored names, have one) and the norms."""
        p = f"layers.{i}."
        out = {}
        for module, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", MLP_NAMES)):
            for name in names:
                for kind in ("weight", "bias"):
                    key = f"{p}{module}.{name}.{kind}"
                    if key in keys:
                        out[f"{name}.{kind}"] = Source(key)
        if spec.qk_norm:
            out["q_norm.weight"] = Source(f"{p}self_attn.q_norm.weight")  # (head_dim,)
            out["k_norm.weight"] = Source(f"{p}self_attn.k_norm.weight")
        out["input_layernorm.weight"] = Source(f"{p}input_layernorm.weight")
        out["post_attention_layernorm.weight"] = Source(f"{p}post_attention_layernorm.weight")
        return out


class Qwen2Family(Family):
    name = "qwen2"

    def qkv_bias(self, c: dict[str, Any]) -> bool:
        return True  # Qwen2 always has q/k/v biases and none on o_proj

    def sliding_window(self, c: dict[str, Any]) -> int | None:
        return c.get("sliding_window") if c.get("use_sliding_window") else None


class Qwen3Family(Qwen2Family):
    """Qwen2 with per-head q/k norms, biases only where ``attention_bias`` says, an explicit head_dim."""

    name = "qwen3"
    qk_norm = True

    def head_dim(self, c: dict[str, Any]) -> int:
        return int(c.get("head_dim") or 128)  # Qwen3Config's default, independent of hidden / heads

    def qkv_bias(self, c: dict[str, Any]) -> bool:
        return bool(c.get("attention_bias", False))


class Phi3Family(Family):
    name = "phi3"

    def sliding_window(self, c: dict[str, Any]) -> int | None:
        return c.get("sliding_window")

    def layer_sources(self, keys: Collection[str], i: int, spec: ModelSpec) -> dict[str, Source]:
        p = f"layers.{i}."
        q, kv, inter = (
            spec.num_heads * spec.head_dim,
            spec.num_kv_heads * spec.head_dim,
            spec.intermediate_size,
        )
        qkv = f"{p}self_attn.qkv_proj.weight"  # (q + 2 kv, hidden): q, k, v stacked by rows
        gate_up = f"{p}mlp.gate_up_proj.weight"  # (2 I, hidden): gate, up
        return {
            "q_proj.weight": Source(qkv, (0, q)),
            "k_proj.weight": Source(qkv, (q, q + kv)),
            "v_proj.weight": Source(qkv, (q + kv, q + 2 * kv)),
            "o_proj.weight": Source(f"{p}self_attn.o_proj.weight"),
            "gate_proj.weight": Source(gate_up, (0, inter)),
            "up_proj.weight": Source(gate_up, (inter, 2 * inter)),
            "down_proj.weight": Source(f"{p}mlp.down_proj.weight"),
            "input_layernorm.weight": Source(f"{p}input_layernorm.weight"),
            "post_attention_layernorm.weight": Source(f"{p}post_attention_layernorm.weight"),
        }


FAMILIES: dict[str, Callable[[], Family]] = {
    "qwen2": Qwen2Family,
    "qwen3": Qwen3Family,
    "llama": Family,
    "phi3": Phi3Family,
}


def get_family(text_config: dict[str, Any]) -> Family:
    model_type = text_config.get("model_type")
    if model_type in REFUSED_MODEL_TYPES:
        raise FailedPrecondition(
            f"language model type {model_type!r} is not supported: {REFUSED_MODEL_TYPES[model_type]} "
            f"(supported: {sorted(FAMILIES)})"
        )
    if model_type not in FAMILIES:
        raise FailedPrecondition(
            f"language model type {model_type!r} is not supported; supported: {sorted(FAMILIES)} "
            "(InternLM2 checkpoints must be converted to the Llama layout first)"
        )
    return FAMILIES[model_type]()
