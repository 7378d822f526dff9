"""``internvl-mesh verify --model PATH``: the fidelity checks on a real checkpoint, one verdict a line.

A plain function with typer annotations; ``mesh.cli`` registers it. Exit codes: 0 when every check
passes, 1 when one fails, 2 when the checkpoint (or an option) is refused before any check ran.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mesh.verify.images import MAX_IMAGES
from services.common.errors import MeshError

EXIT_FAILED = 1
EXIT_REFUSED = 2


def verify_command(
    model: Annotated[Path, typer.Option(help="Checkpoint directory (transformers-native InternVL layout).")],
    reference: Annotated[
        Path | None,
        typer.Option(
            help="Checkpoint the reference (transformers) loads; default: --model. E.g. the official -hf "
            "release, to check a checkpoint made by `internvl-mesh convert` against it."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, or auto (cuda when available).")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="float32, bfloat16, float16, or auto (the checkpoint's own dtype).")
    ] = "auto",
    images: Annotated[int, typer.Option(help=f"Built-in images to use, 1..{MAX_IMAGES}.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens generated per request.")] = 32,
    max_num: Annotated[
        int | None, typer.Option(help="Most tiles per image; default: the checkpoint's max_dynamic_patch.")
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the verdicts and figures to this JSON file.")
    ] = None,
) -> None:
    """Check tiles, embeddings and greedy tokens of the mesh against the reference on built-in images."""
    from mesh.verify.options import VerifyOptions
    from mesh.verify.run import verify

    options = VerifyOptions(
        model=model,
        reference=reference,
        device=device,
        dtype=dtype,
        images=images,
        max_new_tokens=max_new_tokens,
        max_num=max_num,
    )
    try:
        report = verify(options, progress=lambda text: typer.echo(f"verify: {text}", err=True))
    except MeshError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(code=EXIT_REFUSED) from None
    for line in report.lines():
        typer.echo(line)
    if json_path is not None:
        try:
            json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            typer.echo(f"error: cannot write {json_path}: {exc.strerror or exc}", err=True)
            raise typer.Exit(code=EXIT_REFUSED) from None
    raise typer.Exit(code=0 if report.passed else EXIT_FAILED)
