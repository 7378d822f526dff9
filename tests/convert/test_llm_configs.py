"""Per-family LLM config mapping: rope scaling carries over in the form transformers 5 accepts."""

from __future__ import annotations

import pytest
import torch

from services.common.errors import FailedPrecondition
from services.convert.llm import family_for, split_wqkv

INTERNLM2 = {
    "architectures": ["InternLM2ForCausalLM"],
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000,
    "bias": False,
}


@pytest.mark.parametrize("kind", ["dynamic", "linear"])
def test_internlm2_rope_scaling_becomes_llama_rope_parameters(kind):
    from transformers import LlamaConfig

    text = family_for("InternLM2ForCausalLM").text_config(
        INTERNLM2 | {"rope_scaling": {"type": kind, "factor": 2.0}}
    )
    config = LlamaConfig(**text)
    assert config.rope_parameters == {"rope_type": kind, "factor": 2.0, "rope_theta": 1000000.0}
    assert (config.head_dim, config.num_key_value_heads, config.tie_word_embeddings) == (8, 2, False)


def test_internlm2_unknown_rope_scaling_is_refused():
    with pytest.raises(FailedPrecondition, match="rope_scaling type 'yarn'"):
        family_for("InternLM2ForCausalLM").text_config(
            INTERNLM2 | {"rope_scaling": {"type": "yarn", "factor": 2.0}}
        )


def test_phi3_su_scaling_becomes_longrope():
    from transformers import Phi3Config

    llm = {
        "architectures": ["Phi3ForCausalLM"],
        "hidden_size": 32,
        "num_attention_heads": 4,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "su", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
    }
    config = Phi3Config(**family_for("Phi3ForCausalLM").text_config(llm))
    assert config.rope_parameters["rope_type"] == "longrope"
    assert config.rope_parameters["original_max_position_embeddings"] == 4096


def test_split_wqkv_groups_rows_per_kv_head():
    heads, kv, d = 4, 2, 3
    text = {"num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": d}
    rows = torch.arange((heads + 2 * kv) * d).float()[:, None]  # row r holds r
    q, k, v = split_wqkv(rows, text)
    # Per kv head: 2 query heads, then k, then v, each d rows.
    assert q[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16, 17]
    assert k[:, 0].tolist() == [6, 7, 8, 18, 19, 20]
    assert v[:, 0].tolist() == [9, 10, 11, 21, 22, 23]
    with pytest.raises(FailedPrecondition, match="wqkv has"):
        split_wqkv(rows[:-1], text)
