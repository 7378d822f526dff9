"""Conversions between protobuf messages and the shared domain objects.

Servicers call these (``from_pb`` / ``to_pb``) so that they stay thin: protobuf in, one domain call,
protobuf out.
"""

from __future__ import annotations

from internvl.common.v1 import common_pb2

from services.common.context import RequestContext
from services.common.errors import InvalidArgument
from services.common.refs import DEFAULT_NAMESPACE, KIND_CACHE, KIND_INLINE, KIND_OBJECT, EmbeddingRef
from services.common.tensors import WireTensor
from services.common.types import TilingParams

_DTYPE_TO_PB = {
    "uint8": common_pb2.ELEMENT_TYPE_UINT8,
    "int8": common_pb2.ELEMENT_TYPE_INT8,
    "int32": common_pb2.ELEMENT_TYPE_INT32,
    "int64": common_pb2.ELEMENT_TYPE_INT64,
    "float16": common_pb2.ELEMENT_TYPE_FLOAT16,
    "bfloat16": common_pb2.ELEMENT_TYPE_BFLOAT16,
    "float32": common_pb2.ELEMENT_TYPE_FLOAT32,
    "float64": common_pb2.ELEMENT_TYPE_FLOAT64,
}
_PB_TO_DTYPE = {v: k for k, v in _DTYPE_TO_PB.items()}

_KIND_TO_PB = {
    KIND_CACHE: common_pb2.EMBEDDING_REF_KIND_CACHE,
    KIND_OBJECT: common_pb2.EMBEDDING_REF_KIND_OBJECT,
    KIND_INLINE: common_pb2.EMBEDDING_REF_KIND_INLINE,
}
_PB_TO_KIND = {v: k for k, v in _KIND_TO_PB.items()}


def dtype_from_pb(value: int) -> str:
    if value not in _PB_TO_DTYPE:
        raise InvalidArgument(f"tensor element type {value} is not supported")
    return _PB_TO_DTYPE[value]


def tensor_to_pb(t: WireTensor) -> common_pb2.Tensor:
    return common_pb2.Tensor(dtype=_DTYPE_TO_PB[t.dtype], shape=list(t.shape), data=bytes(t.data))


def tensor_from_pb(pb: common_pb2.Tensor) -> WireTensor:
    return WireTensor(dtype_from_pb(pb.dtype), tuple(int(d) for d in pb.shape), pb.data)


def tiling_from_pb(pb: common_pb2.TilingParams, default_max_num: int = 12) -> TilingParams:
    return TilingParams(
        min_num=pb.min_num or 1,
        max_num=pb.max_num or default_max_num,
        use_thumbnail=pb.use_thumbnail if pb.HasField("use_thumbnail") else True,
    ).validate()


def tiling_to_pb(t: TilingParams) -> common_pb2.TilingParams:
    return common_pb2.TilingParams(min_num=t.min_num, max_num=t.max_num, use_thumbnail=t.use_thumbnail)


def context_from_pb(pb: common_pb2.RequestContext) -> RequestContext:
    return RequestContext(
        request_id=pb.request_id,
        tenant=pb.tenant,
        cache_namespace=pb.cache_namespace or DEFAULT_NAMESPACE,
        priority=pb.priority,
        weight=pb.weight or 1.0,
        max_kv_share=pb.max_kv_share or None,
        deadline=pb.deadline_unix_ms / 1000.0 if pb.deadline_unix_ms else None,
        trace=dict(pb.trace_context),
        expires=pb.expires_unix_ms / 1000.0,
        signature=pb.signature,
    )


def context_to_pb(ctx: RequestContext) -> common_pb2.RequestContext:
    return common_pb2.RequestContext(
        request_id=ctx.request_id,
        tenant=ctx.tenant,
        cache_namespace=ctx.cache_namespace,
        priority=ctx.priority,
        weight=ctx.weight,
        max_kv_share=ctx.max_kv_share or 0.0,
        deadline_unix_ms=round(ctx.deadline * 1000) if ctx.deadline else 0,
        trace_context=ctx.trace,
        expires_unix_ms=round(ctx.expires * 1000),
        signature=ctx.signature,
    )


def ref_to_pb(ref: EmbeddingRef) -> common_pb2.EmbeddingRef:
    pb = common_pb2.EmbeddingRef(
        kind=_KIND_TO_PB[ref.kind],
        key=ref.key,
        image_sha256=ref.image_sha256,
        tiles=ref.tiles,
        tokens_per_tile=ref.tokens_per_tile,
        dim=ref.dim,
        dtype=_DTYPE_TO_PB[ref.dtype],
        grid_cols=ref.grid[0],
        grid_rows=ref.grid[1],
        cache_hit=ref.cache_hit,
        frames=ref.frames,
    )
    if ref.kind == KIND_INLINE and ref.tensor is not None:
        pb.tensor.CopyFrom(tensor_to_pb(ref.tensor))
    if ref.kind == KIND_OBJECT:
        raise InvalidArgument("Ray object references travel only through DeploymentHandles, not gRPC")
    return pb


def ref_from_pb(pb: common_pb2.EmbeddingRef) -> EmbeddingRef:
    if pb.kind not in _PB_TO_KIND:
        raise InvalidArgument("embedding reference kind is unspecified")
    kind = _PB_TO_KIND[pb.kind]
    tensor = tensor_from_pb(pb.tensor) if kind == KIND_INLINE else None
    if kind == KIND_OBJECT:
        # Never unpickle an ObjectRef that came over the network.
        raise InvalidArgument("object embedding references are not accepted over gRPC; send cache or inline")
    return EmbeddingRef(
        kind=kind,
        key=pb.key,
        image_sha256=pb.image_sha256,
        tiles=pb.tiles,
        tokens_per_tile=pb.tokens_per_tile,
        dim=pb.dim,
        dtype=dtype_from_pb(pb.dtype),
        grid=(pb.grid_cols or 1, pb.grid_rows or 1),
        cache_hit=pb.cache_hit,
        frames=pb.frames or 1,
        tensor=tensor,
    )
