"""``internvl-mesh train-demo`` and ``internvl-mesh eval-demo``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer


def train_demo_command(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the trained checkpoint into.")],
    steps: Annotated[int, typer.Option(help="Steps of stage 1 (about 0.26 s each on two CPU cores).")] = 6000,
    seed: Annotated[int, typer.Option(help="Seed of the weights and of every step's data.")] = 0,
    vision_steps: Annotated[int, typer.Option(help="Steps of stage 0, the vision tower alone.")] = 800,
    threads: Annotated[int, typer.Option(help="torch threads; 0: torch's default.")] = 0,
    vision_from: Annotated[
        Path | None,
        typer.Option(help="An earlier train-demo output of the same seed and vision steps: reuse its tower."),
    ] = None,
) -> None:
    """Train the demo model (InternViT + projector + Qwen2) on the synthetic shapes task, from scratch."""
    from services.demo.train import TrainConfig, train

    if steps < 1 or vision_steps < 0:
        raise typer.BadParameter("steps must be at least 1 and vision-steps at least 0")
    cfg = TrainConfig(
        steps=steps, vision_steps=vision_steps, seed=seed, threads=threads, vision_from=str(vision_from or "")
    )
    path = train(out_dir, cfg, log=typer.echo)
    typer.echo(f"wrote the demo checkpoint to {path}")


def eval_demo_command(
    model: Annotated[
        Path | None,
        typer.Option(
            help="Checkpoint directory (a train-demo output); default: the shipped demo model, if any."
        ),
    ] = None,
    per_group: Annotated[int, typer.Option(help="Held-out samples per (image kind, question type).")] = 30,
    mutations: Annotated[bool, typer.Option(help="Also measure the mutated inputs.")] = True,
) -> None:
    """Held-out accuracy through transformers' generate, per question type, plain and mutated (JSON)."""
    from services.common.errors import MeshError
    from services.demo import demo_model_path
    from services.demo.evaluate import DemoModel, accuracy, answers
    from services.demo.inputs import reference_pixels
    from services.demo.task import heldout

    try:
        path = model or demo_model_path()
    except MeshError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(code=2) from None
    demo = DemoModel.load(path)
    samples = heldout(per_group)
    pixels = [reference_pixels(s.image) for s in samples]
    report: dict[str, object] = {"model": str(path), "per_group": per_group}
    started = time.monotonic()
    report["plain"] = accuracy(samples, answers(demo, samples, pixels=pixels))
    if mutations:
        for name in ("permute_tiles", "drop_thumbnail", "swap"):
            report[name] = accuracy(samples, answers(demo, samples, name, pixels=pixels))
    report["seconds"] = round(time.monotonic() - started, 1)
    typer.echo(json.dumps(report, indent=2))
