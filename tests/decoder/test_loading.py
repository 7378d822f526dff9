"""Loading the language model: in place, on the model's own device, one slice per rank.

Only the CPU runs here, so the device a CUDA run would load onto is stood in for twice: a model
allocated from ``meta`` onto the CPU must keep every parameter and buffer object and its storage
through loading (a copy in place keeps them; assigning ``.data`` replaces the storage, and on a GPU
would silently move the parameter to the host), and a model allocated on ``meta`` must still be on
``meta`` after loading (the host tensors read from the files are never assigned to it). Each
tensor-parallel rank reads exactly the bytes of the tensors it holds, half of each projection at
two ranks, the fused Phi-3 ``qkv_proj`` / ``gate_up_proj`` taken part by part.
"""

from __future__ import annotations

import pytest
import torch

from services.common.checkpoint import Checkpoint, SliceReader
from services.decoder.engine.model_runner import ModelRunner, plan_model
from services.decoder.models.decoder_lm import build_model
from services.decoder.models.layers import ParallelLinear, TPContext
from tests.decoder.helpers import make_config


def built(ckpt, device: str, tie_head: bool = False):
    checkpoint = Checkpoint.open(ckpt)
    plan = plan_model(make_config(ckpt), checkpoint.text_config)
    model = build_model(
        plan.spec,
        TPContext(),
        plan.backend,
        with_lm_head=True,
        tie_head=tie_head,
        device=torch.device(device),
        dtype=torch.float32,
    )
    return checkpoint, plan, model


def tensors(model) -> dict[str, tuple[torch.Tensor, int]]:
    named = [*model.named_parameters(), *model.named_buffers()]
    return {name: (t, t.data_ptr()) for name, t in named}


def test_weights_are_copied_into_the_allocated_parameters_in_place(tiny_ckpt):
    checkpoint, plan, model = built(tiny_ckpt, "cpu")
    before = tensors(model)
    with SliceReader(checkpoint, "language_model") as lm, SliceReader(checkpoint, "lm_head") as head:
        model.load_weights(plan.family, lm, head)
    after = tensors(model)
    assert after.keys() == before.keys()
    for name, (tensor, ptr) in before.items():
        assert after[name][0] is tensor, f"{name} was replaced"
        assert after[name][1] == ptr, f"{name} was given other storage"
        assert tensor.device == torch.device("cpu"), name
    stored = checkpoint.load_component("language_model")
    assert torch.equal(model.embed_tokens.weight, stored["embed_tokens.weight"])
    assert torch.equal(model.layers[1].mlp.down_proj.weight, stored["layers.1.mlp.down_proj.weight"])
    assert torch.equal(model.lm_head.weight, checkpoint.load_component("lm_head")["weight"])
    assert torch.equal(model.rotary.inv_freq, plan.spec.rope.inv_freq)


def test_loading_leaves_every_tensor_on_the_models_device(tiny_ckpt):
    checkpoint, plan, model = built(tiny_ckpt, "meta")
    with SliceReader(checkpoint, "language_model") as lm, SliceReader(checkpoint, "lm_head") as head:
        model.load_weights(plan.family, lm, head)
    placed = {name: t.device.type for name, (t, _) in tensors(model).items()}
    assert "rotary.inv_freq" in placed
    assert set(placed.values()) == {"meta"}, placed


def test_a_tied_head_is_the_embedding(tiny_ckpt):
    checkpoint, plan, model = built(tiny_ckpt, "cpu", tie_head=True)
    with SliceReader(checkpoint, "language_model") as lm:
        model.load_weights(plan.family, lm, None)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert torch.equal(
        model.lm_head.weight, checkpoint.load_component("language_model")["embed_tokens.weight"]
    )


@pytest.fixture(scope="module")
def phi3_ckpt(tmp_path_factory):
    from services.common.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("loading-phi3"), llm="phi3", seed=2)


def runners(ckpt, size: int) -> list[ModelRunner]:
    config = make_config(ckpt, parallel={"tensor_parallel_size": size})
    return [ModelRunner(config, TPContext(rank=r, size=size)) for r in range(size)]


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def split_bytes(runner: ModelRunner) -> int:
    """The bytes of the projections' weights, which tensor parallelism splits (the embedding, the
    norms and the head are whole on every rank that has them)."""
    return nbytes(m.weight for m in runner.model.modules() if isinstance(m, ParallelLinear))


def unshard(shards: list[torch.Tensor], linear: ParallelLinear, parts: list[int]) -> torch.Tensor:
    """The full weight from the ranks' shards: row-parallel shards side by side; column-parallel
    ones part by part (each rank holds its share of every fused part, e.g. q, k and v)."""
    if linear.row_parallel:
        return torch.cat(shards, dim=1)
    local = [n // len(shards) for n in parts]
    return torch.cat([torch.cat([s.split(local)[j] for s in shards]) for j in range(len(parts))])


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_each_rank_reads_only_its_own_shards(family, tiny_ckpt, phi3_ckpt):
    ckpt = {"qwen2": tiny_ckpt, "phi3": phi3_ckpt}[family]
    (whole,) = runners(ckpt, 1)
    ranks = runners(ckpt, 2)
    assert whole.model.embed_tokens.weight.dtype == torch.float32  # as stored: bytes read = bytes held
    assert whole.bytes_read == nbytes(whole.model.parameters())
    for rank in ranks:
        assert rank.bytes_read == nbytes(rank.model.parameters())  # exactly its shards, nothing more
        assert split_bytes(rank) * 2 == split_bytes(whole)  # half of every projection
        assert rank.bytes_read < whole.bytes_read
    spec = whole.spec
    qkv = [spec.num_heads * spec.head_dim] + [spec.num_kv_heads * spec.head_dim] * 2
    for i, layer in enumerate(whole.model.layers):
        linears = {
            "qkv": (layer.self_attn.qkv_proj, qkv),
            "o": (layer.self_attn.o_proj, []),
            "gate_up": (layer.mlp.gate_up_proj, [spec.intermediate_size] * 2),
            "down": (layer.mlp.down_proj, []),
        }
        for name, (linear, parts) in linears.items():
            shards = [dict(r.model.layers[i].named_modules())[_path(layer, linear)].weight for r in ranks]
            assert torch.equal(unshard(shards, linear, parts), linear.weight), f"layers.{i}.{name}"


def _path(root, module) -> str:
    return next(name for name, m in root.named_modules() if m is module)
