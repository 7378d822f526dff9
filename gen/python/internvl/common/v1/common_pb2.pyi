from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ElementType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ELEMENT_TYPE_UNSPECIFIED: _ClassVar[ElementType]
    ELEMENT_TYPE_UINT8: _ClassVar[ElementType]
    ELEMENT_TYPE_INT8: _ClassVar[ElementType]
    ELEMENT_TYPE_INT32: _ClassVar[ElementType]
    ELEMENT_TYPE_INT64: _ClassVar[ElementType]
    ELEMENT_TYPE_FLOAT16: _ClassVar[ElementType]
    ELEMENT_TYPE_BFLOAT16: _ClassVar[ElementType]
    ELEMENT_TYPE_FLOAT32: _ClassVar[ElementType]
    ELEMENT_TYPE_FLOAT64: _ClassVar[ElementType]

class EmbeddingRefKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EMBEDDING_REF_KIND_UNSPECIFIED: _ClassVar[EmbeddingRefKind]
    EMBEDDING_REF_KIND_CACHE: _ClassVar[EmbeddingRefKind]
    EMBEDDING_REF_KIND_OBJECT: _ClassVar[EmbeddingRefKind]
    EMBEDDING_REF_KIND_INLINE: _ClassVar[EmbeddingRefKind]
ELEMENT_TYPE_UNSPECIFIED: ElementType
ELEMENT_TYPE_UINT8: ElementType
ELEMENT_TYPE_INT8: ElementType
ELEMENT_TYPE_INT32: ElementType
ELEMENT_TYPE_INT64: ElementType
ELEMENT_TYPE_FLOAT16: ElementType
ELEMENT_TYPE_BFLOAT16: ElementType
ELEMENT_TYPE_FLOAT32: ElementType
ELEMENT_TYPE_FLOAT64: ElementType
EMBEDDING_REF_KIND_UNSPECIFIED: EmbeddingRefKind
EMBEDDING_REF_KIND_CACHE: EmbeddingRefKind
EMBEDDING_REF_KIND_OBJECT: EmbeddingRefKind
EMBEDDING_REF_KIND_INLINE: EmbeddingRefKind

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: ElementType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[ElementType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TilingParams(_message.Message):
    __slots__ = ("min_num", "max_num", "use_thumbnail")
    MIN_NUM_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_FIELD_NUMBER: _ClassVar[int]
    USE_THUMBNAIL_FIELD_NUMBER: _ClassVar[int]
    min_num: int
    max_num: int
    use_thumbnail: bool
    def __init__(self, min_num: _Optional[int] = ..., max_num: _Optional[int] = ..., use_thumbnail: _Optional[bool] = ...) -> None: ...

class RequestContext(_message.Message):
    __slots__ = ("request_id", "tenant", "cache_namespace", "priority", "deadline_unix_ms", "trace_context", "expires_unix_ms", "signature", "weight", "max_kv_share")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CACHE_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_KV_SHARE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tenant: str
    cache_namespace: str
    priority: int
    deadline_unix_ms: int
    trace_context: _containers.ScalarMap[str, str]
    expires_unix_ms: int
    signature: bytes
    weight: float
    max_kv_share: float
    def __init__(self, request_id: _Optional[str] = ..., tenant: _Optional[str] = ..., cache_namespace: _Optional[str] = ..., priority: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., expires_unix_ms: _Optional[int] = ..., signature: _Optional[bytes] = ..., weight: _Optional[float] = ..., max_kv_share: _Optional[float] = ...) -> None: ...

class EmbeddingRef(_message.Message):
    __slots__ = ("kind", "key", "image_sha256", "tiles", "tokens_per_tile", "dim", "dtype", "grid_cols", "grid_rows", "cache_hit", "tensor", "frames")
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_TILE_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    GRID_COLS_FIELD_NUMBER: _ClassVar[int]
    GRID_ROWS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    kind: EmbeddingRefKind
    key: str
    image_sha256: str
    tiles: int
    tokens_per_tile: int
    dim: int
    dtype: ElementType
    grid_cols: int
    grid_rows: int
    cache_hit: bool
    tensor: Tensor
    frames: int
    def __init__(self, kind: _Optional[_Union[EmbeddingRefKind, str]] = ..., key: _Optional[str] = ..., image_sha256: _Optional[str] = ..., tiles: _Optional[int] = ..., tokens_per_tile: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[ElementType, str]] = ..., grid_cols: _Optional[int] = ..., grid_rows: _Optional[int] = ..., cache_hit: _Optional[bool] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., frames: _Optional[int] = ...) -> None: ...
