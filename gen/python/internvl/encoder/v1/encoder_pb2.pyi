from internvl.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageSource(_message.Message):
    __slots__ = ("data", "tiles", "tiling", "image_sha256", "grid_cols", "grid_rows")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    TILING_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    GRID_COLS_FIELD_NUMBER: _ClassVar[int]
    GRID_ROWS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    tiles: _common_pb2.Tensor
    tiling: _common_pb2.TilingParams
    image_sha256: str
    grid_cols: int
    grid_rows: int
    def __init__(self, data: _Optional[bytes] = ..., tiles: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., tiling: _Optional[_Union[_common_pb2.TilingParams, _Mapping]] = ..., image_sha256: _Optional[str] = ..., grid_cols: _Optional[int] = ..., grid_rows: _Optional[int] = ...) -> None: ...

class EmbedImagesRequest(_message.Message):
    __slots__ = ("context", "images", "return_inline")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    RETURN_INLINE_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.RequestContext
    images: _containers.RepeatedCompositeFieldContainer[ImageSource]
    return_inline: bool
    def __init__(self, context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., images: _Optional[_Iterable[_Union[ImageSource, _Mapping]]] = ..., return_inline: _Optional[bool] = ...) -> None: ...

class EmbedImagesResponse(_message.Message):
    __slots__ = ("embeddings",)
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[_common_pb2.EmbeddingRef]
    def __init__(self, embeddings: _Optional[_Iterable[_Union[_common_pb2.EmbeddingRef, _Mapping]]] = ...) -> None: ...
