"""Language models of original InternVL checkpoints, one small class per family, behind a registry.

Each family knows three things: the native ``text_config`` for its ``llm_config``, how one original
``language_model.*`` tensor becomes native tensors (the conversion is tensor-local, which is what lets
the converter stream shard by shard), and which tokenizer builder its checkpoints need.

- InternLM2 (InternVL 1.5, InternVL2-2B/8B/26B, 2.5-2B/8B/26B): transformers has no InternLM2 class,
  so it becomes Llama: the fused ``wqkv`` is split per key-value head group, ``w1/w3/w2`` become
  gate/up/down, the norms and embeddings are renamed, rope scaling carries over.
- Qwen2, Qwen3 (dense, InternVL3.5), Phi-3 and Llama are transformers-native already: keys and config
  pass through.
- Mixture-of-experts LLMs (InternVL3.5's ``Qwen3MoeForCausalLM`` and ``GptOssForCausalLM``) are refused
  by name: the decoder has no expert layers to serve them with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from services.common.errors import FailedPrecondition

LLM_PREFIX = "language_model."

# llm_config keys that describe the original runtime, not the model.
_RUNTIME_KEYS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "auto_map",
        "attn_implementation",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "use_flash_attn",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_bfloat16",
        "model_type",
        "bias",
    }
)

_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq\Z")

_MOE = "mixture-of-experts layers are not supported by the decoder"
# Architectures known and refused, with what is missing to serve them.
REFUSED_ARCHITECTURES = {"Qwen3MoeForCausalLM": _MOE, "GptOssForCausalLM": _MOE}


class LlmFamily:
    """Base: transformers-native families whose keys and config pass through unchanged."""

    architectures: ClassVar[tuple[str, ...]] = ()
    model_type: ClassVar[str] = ""
    tokenizer_kind: ClassVar[str] = "auto"

    def text_config(self, llm_config: dict[str, Any]) -> dict[str, Any]:
        config = {k: v for k, v in llm_config.items() if k not in _RUNTIME_KEYS}
        config["model_type"] = self.model_type
        config["use_cache"] = True
        return config

    def convert_tensor(self, name: str, tensor, text_config: dict[str, Any]) -> list[tuple[str, Any]]:
        """One original ``language_model.*`` tensor → native (name, tensor) pairs ([] to drop it)."""
        if _IGNORED.search(name):
            return []
        return [(name, tensor)]


class Qwen2Family(LlmFamily):
    architectures = ("Qwen2ForCausalLM",)
    model_type = "qwen2"


class Qwen3Family(LlmFamily):
    """InternVL3.5's dense LLMs; ``q_norm`` / ``k_norm`` and the explicit ``head_dim`` pass through."""

    architectures = ("Qwen3ForCausalLM",)
    model_type = "qwen3"


class LlamaFamily(LlmFamily):
    architectures = ("LlamaForCausalLM",)
    model_type = "llama"


class Phi3Family(LlmFamily):
    architectures = ("Phi3ForCausalLM",)
    model_type = "phi3"

    def text_config(self, llm_config: dict[str, Any]) -> dict[str, Any]:
        """Phi-3's ``su`` (long-context) rope scaling is transformers' ``longrope``."""
        config = super().text_config(llm_config)
        scaling = config.pop("rope_scaling", None)
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind in ("su", "longrope"):
                original = config.get(
                    "original_max_position_embeddings", config.get("max_position_embeddings")
                )
                config["rope_parameters"] = {
                    "rope_type": "longrope",
                    "short_factor": scaling["short_factor"],
                    "long_factor": scaling["long_factor"],
                    "original_max_position_embeddings": original,
                    "rope_theta": float(config.pop("rope_theta", 10000.0)),
                }
            else:
                config["rope_scaling"] = scaling
        return config


class InternLM2Family(LlmFamily):
    """InternLM2 → Llama (``InternLM2ForCausalLM`` is remote code; ``LlamaForCausalLM`` computes the same)."""

    architectures = ("InternLM2ForCausalLM",)
    model_type = "llama"
    tokenizer_kind = "internlm2_sentencepiece"

    _RENAMES = (
        ("model.tok_embeddings.", "model.embed_tokens."),
        ("output.", "lm_head."),
    )
    _LAYER_RENAMES = (
        ("attention.wo.", "self_attn.o_proj."),
        ("feed_forward.w1.", "mlp.gate_proj."),
        ("feed_forward.w3.", "mlp.up_proj."),
        ("feed_forward.w2.", "mlp.down_proj."),
        ("attention_norm.", "input_layernorm."),
        ("ffn_norm.", "post_attention_layernorm."),
    )
    _LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\Z")

    def text_config(self, llm_config: dict[str, Any]) -> dict[str, Any]:
        c = llm_config
        heads = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(c.get("rope_theta", 10000.0))}
        scaling = c.get("rope_scaling")
        if scaling:
            kind = scaling.get("type", scaling.get("rope_type"))
            # InternLM2's dynamic NTK and linear scaling are the same formulas as transformers' "dynamic"
            # and "linear" rope types, relative to max_position_embeddings.
            if kind not in ("dynamic", "linear"):
                raise FailedPrecondition(
                    f"InternLM2 rope_scaling type {kind!r} is not supported", reason="unsupported_layout"
                )
            rope = {"rope_type": kind, "factor": float(scaling["factor"]), "rope_theta": rope["rope_theta"]}
        return {
            "model_type": "llama",
            "vocab_size": c["vocab_size"],
            "hidden_size": hidden,
            "intermediate_size": c["intermediate_size"],
            "num_hidden_layers": c["num_hidden_layers"],
            "num_attention_heads": heads,
            "num_key_value_heads": int(c.get("num_key_value_heads") or heads),
            "head_dim": hidden // heads,
            "hidden_act": c.get("hidden_act", "silu"),
            "max_position_embeddings": c.get("max_position_embeddings", 2048),
            "initializer_range": c.get("initializer_range", 0.02),
            "rms_norm_eps": c.get("rms_norm_eps", 1e-6),
            "attention_bias": bool(c.get("bias", False)),
            "mlp_bias": False,
            "rope_parameters": rope,
            "tie_word_embeddings": bool(c.get("tie_word_embeddings", False)),
            "pad_token_id": c.get("pad_token_id", 0),
            "bos_token_id": c.get("bos_token_id", 1),
            "eos_token_id": c.get("eos_token_id", 2),
            "use_cache": True,
        }

    def convert_tensor(self, name: str, tensor, text_config: dict[str, Any]) -> list[tuple[str, Any]]:
        if _IGNORED.search(name):
            return []
        key = name[len(LLM_PREFIX) :]
        for old, new in self._RENAMES:
            if key.startswith(old):
                return [(LLM_PREFIX + new + key[len(old) :], tensor)]
        if key == "model.norm.weight":
            return [(name, tensor)]
        m = self._LAYER.match(key)
        if m is None:
            raise _unexpected(name)
        layer, rest = m.groups()
        out = f"{LLM_PREFIX}model.layers.{layer}."
        if rest.startswith("attention.wqkv."):
            return [
                (out + f"self_attn.{p}_proj.{rest.split('.')[-1]}", t)
                for p, t in zip("qkv", split_wqkv(tensor, text_config), strict=True)
            ]
        for old, new in self._LAYER_RENAMES:
            if rest.startswith(old):
                return [(out + new + rest[len(old) :], tensor)]
        raise _unexpected(name)


def split_wqkv(wqkv, text_config: dict[str, Any]):
    """InternLM2's fused ``wqkv`` (weight or bias) → Llama's ``q_proj``, ``k_proj``, ``v_proj``.

    Rows are grouped per key-value head: for each of the ``kv`` heads, ``groups`` query heads, then
    its key head, then its value head, each ``head_dim`` rows (InternLM2Attention:
    ``'b q (h gs d) -> b q h gs d'`` with ``gs = groups + 2``). Query head ``h * groups + g`` keeps
    its index, which is the grouping Llama's ``repeat_kv`` assumes.
    """
    heads = int(text_config["num_attention_heads"])
    kv = int(text_config["num_key_value_heads"])
    head_dim = int(text_config["head_dim"])
    groups = heads // kv
    rows = kv * (groups + 2) * head_dim
    if wqkv.shape[0] != rows:
        raise FailedPrecondition(
            f"wqkv has {wqkv.shape[0]} rows, expected {rows} ({kv} kv heads x ({groups} + 2) x {head_dim})",
            reason="unsupported_layout",
        )
    trailing = tuple(wqkv.shape[1:])
    grouped = wqkv.reshape(kv, groups + 2, head_dim, *trailing)  # (kv, groups+2, head_dim, in?)
    q = grouped[:, :groups].reshape(heads * head_dim, *trailing)  # (heads*head_dim, in?)
    k = grouped[:, groups].reshape(kv * head_dim, *trailing)  # (kv*head_dim, in?)
    v = grouped[:, groups + 1].reshape(kv * head_dim, *trailing)  # (kv*head_dim, in?)
    # clone: views of one storage, which safetensors refuses to write together.
    return q.clone(), k.clone(), v.clone()


def _unexpected(name: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"unexpected tensor {name!r} in the original checkpoint", reason="unsupported_layout"
    )


@dataclass(frozen=True)
class _Registry:
    families: tuple[LlmFamily, ...]

    def for_architecture(self, architecture: str) -> LlmFamily:
        if architecture in REFUSED_ARCHITECTURES:
            raise FailedPrecondition(
                f"LLM architecture {architecture!r} is not supported: {REFUSED_ARCHITECTURES[architecture]}",
                reason="unsupported_layout",
            )
        for family in self.families:
            if architecture in family.architectures:
                return family
        supported = sorted(a for f in self.families for a in f.architectures)
        raise FailedPrecondition(
            f"unsupported LLM architecture {architecture!r}; supported: {', '.join(supported)}",
            reason="unsupported_layout",
        )


REGISTRY = _Registry((InternLM2Family(), Qwen2Family(), Qwen3Family(), Phi3Family(), LlamaFamily()))


def family_for(architecture: str) -> LlmFamily:
    return REGISTRY.for_architecture(architecture)
