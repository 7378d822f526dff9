"""``internvl-mesh tiles IMAGE``: show how an image is tiled, and optionally write the tiles.

A plain function with typer annotations; the top-level CLI registers it with
``app.command("tiles")(tiles_command)``. Useful to see what a request will cost in tiles and image
tokens before sending it, and to inspect the exact tiles the encoder will see.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from PIL import Image

from services.common.errors import InvalidArgument
from services.common.types import TOKENS_PER_TILE, TilingParams, sha256_hex
from services.preprocess.config import DecodeLimits
from services.preprocess.decoding import decode_image
from services.preprocess.tiling import tile_image

EXIT_BAD_INPUT = 2


def tiles_command(
    image: Annotated[Path, typer.Argument(help="Image file (JPEG, PNG, WebP, GIF, BMP or TIFF).")],
    max_num: Annotated[int, typer.Option("--max-num", help="Most grid tiles (1..40).")] = 12,
    min_num: Annotated[int, typer.Option("--min-num", help="Fewest grid tiles (1..max-num).")] = 1,
    no_thumbnail: Annotated[
        bool, typer.Option("--no-thumbnail", help="Do not append the whole-image thumbnail tile.")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write the tiles as tile_000.png, ... (thumbnail last) into this folder."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the facts as JSON.")] = False,
) -> None:
    """Print an image's tile grid, tile count and image-token count (256 per 448-pixel tile)."""
    try:
        data = image.read_bytes()
    except OSError as exc:
        _fail(f"cannot read {image}: {exc.strerror or exc}")
    params = TilingParams(min_num=min_num, max_num=max_num, use_thumbnail=not no_thumbnail)
    try:
        params.validate()
        tiled = tile_image(decode_image(data, DecodeLimits()), params, sha256=sha256_hex(data))
    except InvalidArgument as exc:
        _fail(f"{image}: {exc.message}")

    files: list[str] = []
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
            for k, tile in enumerate(tiled.tiles):
                path = out / f"tile_{k:03d}.png"
                Image.fromarray(tile, "RGB").save(path)
                files.append(str(path))
        except OSError as exc:
            _fail(f"cannot write tiles to {out}: {exc.strerror or exc}")

    cols, rows = tiled.grid
    facts = {
        "image": str(image),
        "width": tiled.width,
        "height": tiled.height,
        "sha256": tiled.sha256,
        "grid": {"cols": cols, "rows": rows},
        "tiles": tiled.num_tiles,
        "thumbnail": tiled.has_thumbnail,
        "tile_size": params.tile_size,
        "image_tokens": tiled.num_image_tokens(TOKENS_PER_TILE),
        "files": files,
    }
    if json_output:
        typer.echo(json.dumps(facts, indent=2))
        return
    thumb = " (incl. thumbnail)" if tiled.has_thumbnail else ""
    typer.echo(f"image:        {image} ({tiled.width}x{tiled.height})")
    typer.echo(f"grid:         {cols}x{rows} (cols x rows)")
    typer.echo(f"tiles:        {tiled.num_tiles}{thumb}")
    typer.echo(f"image tokens: {facts['image_tokens']}")
    if files:
        typer.echo(f"wrote:        {len(files)} tiles to {out}")


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=EXIT_BAD_INPUT)
