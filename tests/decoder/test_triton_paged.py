"""The Triton paged-decode kernel and the ``triton_paged`` backend, on CPU in Triton's interpreter.

The kernel is the one CUDA runs: here Triton interprets it on CPU tensors (the suite's conftest sets
``TRITON_INTERPRET=1`` on a machine without CUDA). It is checked against the float64 reference of
``test_torch_paged`` (scattered and consecutive blocks, partial last blocks, mixed prefill), against
torch's per-sequence path at real GQA shapes (7 query heads per KV head, head_dim 24 and 128), on the
static-shape buffers of the graph path, and end to end: greedy tokens on the tiny checkpoint identical
to the default backend's. Triton is a test dependency (the ``test`` extra): without it this module
fails to import, by name.
"""

from __future__ import annotations

import pytest
import torch
import triton  # noqa: F401 - a test dependency: its absence fails here, by name

from services.decoder.attention.registry import (
    AttentionMetadata,
    StaticDecode,
    is_backend_available,
    resolve_backend_name,
)
from services.decoder.attention.torch_paged import TorchPagedBackend, decode_static_padded
from services.decoder.attention.triton_kernels import interpreted, paged_decode
from services.decoder.attention.triton_paged import TritonPagedBackend
from services.decoder.engine.llm_engine import LLMEngine
from tests.decoder.helpers import CASES, make_config, make_input, run, tokens_of
from tests.decoder.test_torch_paged import BS, HKV, D, batch, reference

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CPU interpreter run; tests/gpu runs the compiled kernel"
)


def test_interpreter_is_on_without_cuda():
    assert interpreted(), "TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py)"
    assert is_backend_available("triton_paged", "cpu")


@pytest.mark.parametrize("order", ["mixed", "decode_first"])
def test_backend_matches_reference(order):
    q, k, v, k_cache, v_cache, slots, qsl, ctx, tables = batch(0)
    if order == "decode_first":
        keep = [0, 1, 2, 5]  # the decodes only: rows 0..3, the kernel writes ``out`` in place
        q, k, v = q[keep], k[keep], v[keep]
        slots = [slots[qsl[i]] for i in keep]
        ctx, tables, qsl = [ctx[i] for i in keep], [tables[i] for i in keep], list(range(len(keep) + 1))
    want = reference(q, k, v, k_cache, v_cache, slots, qsl, ctx, tables)
    backend = TritonPagedBackend()
    meta = AttentionMetadata(torch.tensor(slots), qsl, ctx, tables, BS)
    backend.prepare(meta, "cpu")
    kc, vc = k_cache.clone(), v_cache.clone()
    got = backend.forward(q, k, v, kc, vc, meta, D**-0.5)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc.view(-1, HKV, D)[slots], k)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size"), [(28, 4, 128, 16), (14, 2, 24, 8)])
def test_kernel_matches_per_sequence_at_gqa_shapes(heads, kv_heads, head_dim, block_size):
    """Qwen2.5-7B's grouping (7 query heads per KV head) at head_dim 128, and a head_dim (24) that is
    not a power of two: the kernel's padded tiles must not leak."""
    g = torch.Generator().manual_seed(1)
    lens = [1, 17, 40, 33]
    num_blocks = 64
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for n in lens:
        need = -(-n // block_size)
        tables.append(perm[used : used + need])
        used += need
    q = torch.randn(len(lens), heads, head_dim, generator=g)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    got = paged_decode(q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32), head_dim**-0.5)
    # torch's per-sequence path: the step's K/V are already in the cache, so write them back unchanged
    slots = torch.tensor([t[(n - 1) // block_size] * block_size + (n - 1) % block_size
                          for t, n in zip(tables, lens, strict=True)])  # fmt: skip
    k = k_cache.view(-1, kv_heads, head_dim)[slots].clone()
    v = v_cache.view(-1, kv_heads, head_dim)[slots].clone()
    meta = AttentionMetadata(slots, list(range(len(lens) + 1)), lens, tables, block_size)
    torch_backend = TorchPagedBackend("per_sequence")
    torch_backend.prepare(meta, "cpu")
    want = torch_backend.forward(q, k, v, k_cache.clone(), v_cache.clone(), meta, head_dim**-0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_static_decode_kernel_matches_torch_static_path():
    """The graph path's buffers: a table wider than any row needs, stale block ids past each row's
    length, and padding rows of length 1 on a scratch block."""
    g = torch.Generator().manual_seed(2)
    lens = [9, 3, 1, 1]  # the last two: padding rows
    table = torch.randint(0, 32, (4, 6), generator=g, dtype=torch.int32)  # (B, W), W wider than needed
    q = torch.randn(4, 4, D, generator=g)
    k_cache = torch.randn(32, BS, HKV, D, generator=g)
    v_cache = torch.randn(32, BS, HKV, D, generator=g)
    static = StaticDecode(table, torch.tensor(lens, dtype=torch.int32))
    got = paged_decode(q, k_cache, v_cache, static.block_table, static.context_lens, D**-0.5)
    want = decode_static_padded(q, k_cache, v_cache, static, D**-0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_registry_picks_triton_paged_only_when_named():
    assert resolve_backend_name("auto", "cpu", 16) == "torch_paged"
    assert resolve_backend_name("triton_paged", "cpu", 16) == "triton_paged"


def test_greedy_tokens_match_the_default_backend(tiny_ckpt, reference, engine):
    """Batched greedy decoding of text and image requests: identical tokens with triton_paged."""
    cases = CASES[:4]
    inputs = [make_input(f"t{i}", c, reference) for i, c in enumerate(cases)]
    want = {k: tokens_of(e) for k, e in run(engine, inputs).items()}
    triton_engine = LLMEngine(make_config(tiny_ckpt, attention_backend="triton_paged"))
    try:
        assert triton_engine.executor.runner.backend.name == "triton_paged"
        got = {k: tokens_of(e) for k, e in run(triton_engine, inputs).items()}
    finally:
        triton_engine.shutdown()
    assert got == want
    assert all(len(t) > 0 for t in got.values())
