from internvl.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageInput(_message.Message):
    __slots__ = ("data", "tiling")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TILING_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    tiling: _common_pb2.TilingParams
    def __init__(self, data: _Optional[bytes] = ..., tiling: _Optional[_Union[_common_pb2.TilingParams, _Mapping]] = ...) -> None: ...

class TileImagesRequest(_message.Message):
    __slots__ = ("context", "images")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.RequestContext
    images: _containers.RepeatedCompositeFieldContainer[ImageInput]
    def __init__(self, context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., images: _Optional[_Iterable[_Union[ImageInput, _Mapping]]] = ...) -> None: ...

class TiledImage(_message.Message):
    __slots__ = ("tiles", "grid_cols", "grid_rows", "width", "height", "image_sha256", "num_image_tokens")
    TILES_FIELD_NUMBER: _ClassVar[int]
    GRID_COLS_FIELD_NUMBER: _ClassVar[int]
    GRID_ROWS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    tiles: _common_pb2.Tensor
    grid_cols: int
    grid_rows: int
    width: int
    height: int
    image_sha256: str
    num_image_tokens: int
    def __init__(self, tiles: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., grid_cols: _Optional[int] = ..., grid_rows: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., image_sha256: _Optional[str] = ..., num_image_tokens: _Optional[int] = ...) -> None: ...

class TileImagesResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[TiledImage]
    def __init__(self, images: _Optional[_Iterable[_Union[TiledImage, _Mapping]]] = ...) -> None: ...
