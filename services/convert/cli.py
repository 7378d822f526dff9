"""``internvl-mesh convert SRC DST``: the command-line face of ``services.convert.converter``.

The lead's CLI registers ``convert_command`` on its typer app; this module parses nothing itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from services.common.errors import MeshError
from services.convert.converter import convert_checkpoint


def convert_command(
    src: Annotated[Path, typer.Argument(help="Original-format InternVL chat checkpoint directory.")],
    dst: Annotated[Path, typer.Argument(help="Directory to write the transformers-native checkpoint to.")],
    dtype: Annotated[
        str | None,
        typer.Option(
            help="Cast floating-point weights (bfloat16, float16, float32); default: keep the checkpoint's."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace DST if it exists.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            help="Write DST even where the mesh's encoder or decoder would refuse it (the reasons are printed)."
        ),
    ] = False,
) -> None:
    """Convert an original InternVL 1.5 / 2 / 2.5 / 3 checkpoint to transformers' native layout.

    The output is checked as `internvl-mesh serve` checks a checkpoint; one that the mesh would refuse
    is not written (exit code 2, with the reasons) unless --force is given.
    """
    try:
        report = convert_checkpoint(src, dst, dtype=dtype, overwrite=overwrite, force=force)
    except MeshError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(code=2) from None
    for reason in report.refusals:
        typer.echo(f"warning: written with --force, but the mesh will refuse it: {reason}", err=True)
    typer.echo(
        f"wrote {report.dst}: {report.tensors} tensors in {report.shards} shard(s), dtype {report.dtype}, "
        f"LLM {report.llm_architecture} → {report.native_text_model_type}, template {report.template} "
        f"(system message from {report.system_message_source}), ps_version {report.ps_version}"
    )
