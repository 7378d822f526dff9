"""Plain domain objects that cross service boundaries (no torch, no gRPC)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from services.common.errors import InvalidArgument
from services.common.limits import MAX_TILES_PER_IMAGE

__all__ = ["MAX_TILES_PER_IMAGE", "TILE_SIZE", "TilingParams", "sha256_hex"]

TILE_SIZE = 448


@dataclass(frozen=True)
class TilingParams:
    """How one image is cut into tiles (INTERNVL.md, "Dynamic tiling")."""

    min_num: int = 1
    max_num: int = 12
    use_thumbnail: bool = True
    tile_size: int = TILE_SIZE

    def validate(self) -> TilingParams:
        if not 1 <= self.min_num <= MAX_TILES_PER_IMAGE:
            raise InvalidArgument(f"min_num must be in 1..{MAX_TILES_PER_IMAGE}, got {self.min_num}")
        if not 1 <= self.max_num <= MAX_TILES_PER_IMAGE:
            raise InvalidArgument(f"max_num must be in 1..{MAX_TILES_PER_IMAGE}, got {self.max_num}")
        if self.min_num > self.max_num:
            raise InvalidArgument(f"min_num ({self.min_num}) must not exceed max_num ({self.max_num})")
        if not 14 <= self.tile_size <= 1792:
            raise InvalidArgument(f"tile_size must be in 14..1792, got {self.tile_size}")
        return self

    def cache_token(self) -> str:
        """A stable string naming these parameters inside cache keys."""
        return f"t{self.tile_size}-min{self.min_num}-max{self.max_num}-th{int(self.use_thumbnail)}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
