import numpy as np
import pytest
import torch

from services.common.errors import InvalidArgument
from services.common.refs import KIND_INLINE, EmbeddingRef, embedding_key
from services.common.tensors import WireTensor
from services.common.types import TilingParams, sha256_hex
from services.embedding_cache.store import StoredEmbedding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int64])
def test_torch_roundtrip_is_bit_exact(dtype):
    t = (torch.randn(5, 7) * 100).to(dtype)
    w = WireTensor.from_torch(t)
    back = w.to_torch()
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(
        back.view(torch.uint8) if dtype != torch.uint8 else back,
        t.view(torch.uint8) if dtype != torch.uint8 else t,
    )


def test_bfloat16_bytes_are_little_endian_bit_patterns():
    t = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    w = WireTensor.from_torch(t)
    assert w.dtype == "bfloat16"
    assert bytes(w.data) == b"\x80\x3f\x00\xc0"


def test_numpy_view_without_copy():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    w = WireTensor.from_numpy(a)
    assert w.shape == (3, 4) and np.array_equal(w.to_numpy(), a)


@pytest.mark.parametrize(
    "dtype,shape,data",
    [("complex64", (1,), b"\0" * 8), ("float32", (2, 2), b"\0" * 15), ("float32", (-1,), b"")],
)
def test_bad_tensors_are_invalid_argument(dtype, shape, data):
    with pytest.raises(InvalidArgument):
        WireTensor(dtype, shape, data)


def test_split_and_concat_per_tile():
    t = WireTensor.from_torch(torch.randn(3 * 256, 8))
    entry = StoredEmbedding.from_tensor(t, tiles=3)
    assert len(entry.tiles) == 3 and entry.tiles[1].shape == (256, 8)
    assert bytes(entry.concat().data) == bytes(t.data)


def test_embedding_key_changes_with_every_input():
    h = sha256_hex(b"image")
    base = embedding_key("tenant-a", "ckpt@1|main|float32", TilingParams(), h)
    variants = {
        embedding_key("tenant-b", "ckpt@1|main|float32", TilingParams(), h),
        embedding_key("tenant-a", "ckpt@1|main|bfloat16", TilingParams(), h),
        embedding_key("tenant-a", "ckpt@1|main|float32", TilingParams(max_num=6), h),
        embedding_key("tenant-a", "ckpt@1|main|float32", TilingParams(use_thumbnail=False), h),
        embedding_key("tenant-a", "ckpt@1|main|float32", TilingParams(), sha256_hex(b"other")),
    }
    assert base not in variants and len(variants) == 5
    assert base == embedding_key("tenant-a", "ckpt@1|main|float32", TilingParams(), h)
    assert base.startswith("ivm:emb:v1:tenant-a:")


def test_embedding_key_prefix_is_its_first_segment():
    h = sha256_hex(b"image")
    default = embedding_key("tenant-a", "e", TilingParams(), h)
    other = embedding_key("tenant-a", "e", TilingParams(), h, prefix="mesh-b")
    assert other == "mesh-b" + default.removeprefix("ivm")
    with pytest.raises(InvalidArgument):
        embedding_key("tenant-a", "e", TilingParams(), h, prefix="a:b")


@pytest.mark.parametrize("ns", ["", "a b", "x" * 65, "ns:colon", "../etc"])
def test_bad_namespace_rejected(ns):
    with pytest.raises(InvalidArgument):
        embedding_key(ns, "e", TilingParams(), sha256_hex(b""))


def test_inline_ref_checks_shape():
    tensor = WireTensor.from_torch(torch.zeros(512, 8))
    ref = EmbeddingRef(
        KIND_INLINE, "", sha256_hex(b"x"), tiles=2, tokens_per_tile=256, dim=8, dtype="float32", tensor=tensor
    )
    assert ref.shape == (512, 8)
    with pytest.raises(InvalidArgument):
        EmbeddingRef(
            KIND_INLINE,
            "",
            sha256_hex(b"x"),
            tiles=3,
            tokens_per_tile=256,
            dim=8,
            dtype="float32",
            tensor=tensor,
        )


def test_names_match_whole_strings_only():
    """A trailing newline is not part of a valid namespace, prefix or hash (``$`` would accept it)."""
    import pytest

    from services.common.errors import InvalidArgument
    from services.common.refs import embedding_key, key_namespace, validate_namespace
    from services.common.types import TilingParams

    sha = "a" * 64
    for bad in (lambda: validate_namespace("acme\n"),
                lambda: embedding_key("acme", "enc", TilingParams(), sha + "\n"),
                lambda: embedding_key("acme", "enc", TilingParams(), sha, prefix="ivm\n")):  # fmt: skip
        with pytest.raises(InvalidArgument):
            bad()
    assert key_namespace(embedding_key("acme", "enc", TilingParams(), sha)) == "acme"
    assert key_namespace("ivm:emb:v1:acme\n:x:y:z") is None
