"""The ``internvl-mesh`` command line: the one place that reads flags, files and the environment.

Each command builds a validated config object and calls into library code; heavy imports (torch,
transformers, Ray) happen inside the commands that need them, so ``--help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from services.common.errors import MeshError

app = typer.Typer(
    name="internvl-mesh",
    help="InternVL Mesh: serve InternVL vision-language models as a mesh of gRPC services.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(exc: MeshError) -> None:
    typer.echo(f"error: {exc.message}", err=True)
    raise typer.Exit(code=2)


@app.command("make-tiny-checkpoint")
def make_tiny_checkpoint_command(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the checkpoint into.")],
    preset: Annotated[str, typer.Option(help="tiny (tests) or small (benchmarks).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    llm: Annotated[str, typer.Option(help="Language-model family: qwen2, llama, qwen3 or phi3.")] = "qwen2",
) -> None:
    """Write a random-weight InternVL checkpoint in transformers' native format."""
    from services.common.tiny_checkpoint import make_tiny_checkpoint

    try:
        path = make_tiny_checkpoint(out_dir, preset=preset, seed=seed, llm=llm)
    except MeshError as exc:
        _fail(exc)
    typer.echo(f"wrote {preset} checkpoint ({llm}, seed {seed}, random weights) to {path}")


DEFAULT_MODEL_DIR = Path(".work/tiny")


@app.command("serve-grpc")
def serve_grpc_command(
    model: Annotated[
        Path | None,
        typer.Option(
            help="Checkpoint directory (native InternVL format). Default: a tiny random-weight model."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="gRPC port (0 picks a free one).")] = 50051,
    device: Annotated[str, typer.Option(help="cpu or cuda[:N].")] = "cpu",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    redis_url: Annotated[
        str, typer.Option(help="redis://host:port/db for the shared embedding cache; empty: none.")
    ] = "",
) -> None:
    """Serve the preprocess and encoder gRPC services in one process (no Ray)."""
    import asyncio

    from mesh.standalone import StandaloneConfig, check_standalone, serve_standalone

    if model is None:
        _, model = _default_model()
    config = StandaloneConfig(
        model=model, host=host, port=port, device=device, dtype=dtype, redis_url=redis_url
    )
    try:
        check_standalone(config)
        asyncio.run(serve_standalone(config))
    except MeshError as exc:
        _fail(exc)


config_app = typer.Typer(help="The mesh configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def _mesh_config(
    model: Path | None,
    config: Path | None,
    http_port: int | None,
    grpc_port: int | None,
    overrides: list[str],
    redis_url: str | None = None,
):
    from mesh.topology import MeshConfig
    from services.common.config import build, load_yaml, parse_override, set_dotted

    data = load_yaml(config) if config is not None else {}
    if model is not None:
        data["models"] = [{"name": model.resolve().name, "path": str(model.resolve())}]
    elif not data.get("models"):
        name, path = _default_model()
        data["models"] = [{"name": name, "path": str(path.resolve())}]
    gateway = data.setdefault("gateway", {})
    if http_port is not None:
        gateway["http_port"] = http_port
    if grpc_port is not None:
        gateway["grpc_port"] = grpc_port
    if redis_url is not None:
        data.setdefault("redis", {})["url"] = redis_url
    for item in overrides:
        set_dotted(data, *parse_override(item))
    return build(MeshConfig, data, str(config) if config else "flags")


def _default_model() -> tuple[str, Path]:
    """(name, path) of what runs when no model is given: the shipped demo model (``services.demo``),
    or, in a checkout without one, a tiny random-weight checkpoint made in :data:`DEFAULT_MODEL_DIR`."""
    from services.demo import DEMO_MODEL_NAME, demo_model_path

    try:
        path = demo_model_path()
    except MeshError:
        pass
    else:
        typer.echo(
            f"no model given: serving the embedded demo model {DEMO_MODEL_NAME} ({path}); see docs/demo-model.md"
        )
        return DEMO_MODEL_NAME, path
    model = DEFAULT_MODEL_DIR
    if not (model / "config.json").is_file():
        from services.common.tiny_checkpoint import make_tiny_checkpoint

        make_tiny_checkpoint(model)
    typer.echo(f"no model given: serving the tiny RANDOM-WEIGHT checkpoint in {model} (answers are noise)")
    return "internvl-mesh-tiny", model


@app.command("serve")
def serve_command(
    model: Annotated[Path | None, typer.Option(help="Checkpoint directory (native InternVL format).")] = None,
    config: Annotated[Path | None, typer.Option(help="Mesh configuration YAML.")] = None,
    http_port: Annotated[int | None, typer.Option(help="HTTP port of the OpenAI-compatible API.")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="Port of the public gRPC API (0: off).")] = None,
    redis_url: Annotated[str | None, typer.Option(help="redis://host:port/db; default: none.")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override a config value: a.b.c=value.")] = [],  # noqa: B006
) -> None:
    """Start a local Ray, deploy every service and the gateway, and serve until SIGTERM/Ctrl-C."""
    import logging

    from mesh import serve as mesh_serve
    from mesh.support import check_models

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = _mesh_config(model, config, http_port, grpc_port, set_, redis_url)
        check_models(cfg)  # before Ray starts: a checkpoint a service would refuse fails here, in seconds
    except MeshError as exc:
        _fail(exc)
    if not cfg.gateway.tenants_file:
        typer.echo("no tenants file: single-tenant mode, no API keys are checked")
    mesh_serve.run(cfg)


@config_app.command("render")
def config_render_command(
    model: Annotated[Path | None, typer.Option(help="Checkpoint directory.")] = None,
    config: Annotated[Path | None, typer.Option(help="Mesh configuration YAML.")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override a config value: a.b.c=value.")] = [],  # noqa: B006
) -> None:
    """Print the Ray Serve config (for `serve deploy` and KubeRay's serveConfigV2). No secrets inside."""
    import yaml

    from mesh.topology import render_serve_config

    try:
        cfg = _mesh_config(model or Path("/models/model"), config, None, None, set_)
        rendered = render_serve_config(cfg)
    except MeshError as exc:
        _fail(exc)
    typer.echo(yaml.safe_dump(rendered, sort_keys=False))


def _register_optional_commands() -> None:
    """Commands whose implementations live with their services."""
    from services.preprocess.cli import tiles_command

    app.command("tiles", help="Show how an image is tiled: grid, tiles and image tokens.")(tiles_command)

    from services.convert.cli import convert_command

    app.command("convert", help="Convert an original-format InternVL checkpoint to the native layout.")(
        convert_command
    )
    from services.demo.cli import eval_demo_command, train_demo_command

    app.command("train-demo", help="Train the demo model on the synthetic shapes task (CPU, long).")(
        train_demo_command
    )
    app.command("eval-demo", help="Held-out accuracy of a demo checkpoint through transformers' generate.")(
        eval_demo_command
    )
    from mesh.verify.cli import verify_command

    app.command(
        "verify", help="Check a checkpoint's tiles, embeddings and greedy tokens against the reference."
    )(verify_command)
    from mesh.ops_cli import register_ops_commands

    register_ops_commands(app)


def main(argv: list[str] | None = None) -> None:
    _register_optional_commands()
    try:
        app(args=argv)
    except MeshError as exc:  # a domain error that escaped a command: one clean line, no traceback
        typer.echo(f"error: {exc.message}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
