"""Reading an original-format InternVL chat checkpoint (the ``InternVLChatModel`` layout).

The layout: ``config.json`` with ``vision_config`` (InternViT), ``llm_config`` (the language model's own
config, whose ``architectures[0]`` names its family), ``template``, ``ps_version``, ``downsample_ratio``,
``select_layer`` and the tiling settings; weights under ``vision_model.*``, ``mlp1.*`` and
``language_model.*`` in safetensors (or ``.bin``) shards; a tokenizer; and the checkpoint's own Python
(``conversation.py``, ``modeling_internvl_chat.py``), which is read as text and never executed.

Defaults for absent keys follow ``InternVLChatConfig``: ``ps_version`` ``v1``, ``downsample_ratio``
0.5, ``select_layer`` -1, ``max_dynamic_patch`` 6, ``min_dynamic_patch`` 1, ``use_thumbnail`` false,
``dynamic_image_size`` false.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.errors import FailedPrecondition

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

PS_VERSIONS = ("v1", "v2")


@dataclass(frozen=True)
class OriginalCheckpoint:
    """What the converter needs from an original checkpoint directory; tensors stay on disk."""

    path: Path
    config: dict[str, Any]
    shards: tuple[Path, ...]
    weight_format: str  # "safetensors" or "bin"

    @property
    def vision_config(self) -> dict[str, Any]:
        return self.config["vision_config"]

    @property
    def llm_config(self) -> dict[str, Any]:
        return self.config["llm_config"]

    @property
    def llm_architecture(self) -> str:
        return self.llm_config["architectures"][0]

    @property
    def template(self) -> str:
        return self.config["template"]

    @property
    def ps_version(self) -> str:
        return self.config.get("ps_version", "v1")

    @property
    def downsample_ratio(self) -> float:
        return float(self.config.get("downsample_ratio", 0.5))

    @property
    def select_layer(self) -> int:
        return int(self.config.get("select_layer", -1))

    @property
    def image_size(self) -> int:
        """The tile size the model was trained at (``force_image_size`` wins over the ViT's own)."""
        return int(self.config.get("force_image_size") or _first(self.vision_config["image_size"]))

    @property
    def image_seq_length(self) -> int:
        """Tokens per tile: (image_size / patch)² × downsample_ratio², as ``InternVLChatModel`` computes."""
        patch = _first(self.vision_config["patch_size"])
        return int((self.image_size // patch) ** 2 * (self.downsample_ratio**2))

    def tiling(self) -> dict[str, Any]:
        return {
            "max_dynamic_patch": int(self.config.get("max_dynamic_patch", 6)),
            "min_dynamic_patch": int(self.config.get("min_dynamic_patch", 1)),
            "use_thumbnail": bool(self.config.get("use_thumbnail", False)),
            "dynamic_image_size": bool(self.config.get("dynamic_image_size", False)),
        }

    def iter_tensors(self, shard: Path) -> Iterator[tuple[str, Any]]:
        """(name, tensor) for every tensor of one shard, read one at a time where the format allows."""
        if self.weight_format == "safetensors":
            from safetensors import safe_open

            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            import torch

            # weights_only refuses pickled code; mmap keeps the shard on disk until a tensor is touched.
            state = torch.load(str(shard), map_location="cpu", weights_only=True, mmap=True)
            for name in list(state):
                yield name, state.pop(name)

    def shard_keys(self, shard: Path) -> list[str]:
        if self.weight_format == "safetensors":
            from safetensors import safe_open

            with safe_open(str(shard), framework="pt") as f:
                return list(f.keys())
        return [name for name, _ in self.iter_tensors(shard)]


def _first(value) -> int:
    return int(value[0] if isinstance(value, list | tuple) else value)


def open_original(path: str | Path) -> OriginalCheckpoint:
    """Validate the directory's layout and config; raise ``FailedPrecondition`` saying what is wrong."""
    root = Path(path)
    if not root.is_dir():
        raise FailedPrecondition(f"{root} is not a directory", reason="checkpoint_missing")
    config_path = root / "config.json"
    if not config_path.is_file():
        raise FailedPrecondition(f"{root} has no config.json", reason="unsupported_layout")
    config = json.loads(config_path.read_text("utf-8"))
    _validate_config(config, root)
    shards, weight_format = _find_shards(root)
    return OriginalCheckpoint(path=root, config=config, shards=shards, weight_format=weight_format)


def _validate_config(config: dict[str, Any], root: Path) -> None:
    if "text_config" in config and "llm_config" not in config:
        raise FailedPrecondition(
            f"{root} is already in transformers' native InternVL layout (text_config); load it directly",
            reason="unsupported_layout",
        )
    missing = [k for k in ("vision_config", "llm_config", "template") if not config.get(k)]
    if missing:
        raise FailedPrecondition(
            f"{root}/config.json is not an original InternVL chat config: missing {', '.join(missing)}",
            reason="unsupported_layout",
        )
    archs = config["llm_config"].get("architectures") or []
    if not archs:
        raise FailedPrecondition(
            f"{root}/config.json: llm_config.architectures is missing, so the LLM family is unknown",
            reason="unsupported_layout",
        )
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size"):
        if key not in config["vision_config"]:
            raise FailedPrecondition(
                f"{root}/config.json: vision_config.{key} is missing", reason="unsupported_layout"
            )
    ps = config.get("ps_version", "v1")
    if ps not in PS_VERSIONS:
        raise FailedPrecondition(
            f"ps_version must be one of {PS_VERSIONS}, got {ps!r}", reason="unsupported_layout"
        )
    ratio = float(config.get("downsample_ratio", 0.5))
    if ratio != 0.5:
        raise FailedPrecondition(
            f"downsample_ratio {ratio} is not supported (every released InternVL uses 0.5)",
            reason="unsupported_layout",
        )


def _find_shards(root: Path) -> tuple[tuple[Path, ...], str]:
    for index_name, single, fmt in (
        (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, "safetensors"),
        (BIN_INDEX, BIN_SINGLE, "bin"),
    ):
        index = root / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text("utf-8")).get("weight_map") or {}
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (root / n).is_file()]
            if not names or missing:
                raise FailedPrecondition(
                    f"{index} lists shards that are not there: {missing or 'none listed'}",
                    reason="unsupported_layout",
                )
            return tuple(root / n for n in names), fmt
        if (root / single).is_file():
            return (root / single,), fmt
    raise FailedPrecondition(
        f"{root} has no weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json])",
        reason="unsupported_layout",
    )


# -- the checkpoint's system message -------------------------------------------------------------


def read_system_message(root: Path, template: str) -> tuple[str | None, str]:
    """The system message the checkpoint's own ``chat()`` uses, and where it was found.

    Read statically (``ast``) from the checkpoint's Python, never executed: an assignment
    ``self.system_message = '...'`` in ``modeling_internvl_chat.py`` overrides the template's default
    in ``conversation.py`` (``Conversation(name=template, system_message=...)``). ``(None, reason)``
    when neither file says, and the caller falls back to the built-in template data.
    """
    modeling = root / "modeling_internvl_chat.py"
    if modeling.is_file():
        found = _literal_self_assignment(modeling.read_text("utf-8"), "system_message")
        if found is not None:
            return found, f"{modeling.name} (self.system_message)"
    conversation = root / "conversation.py"
    if conversation.is_file():
        found = _conversation_system_message(conversation.read_text("utf-8"), template)
        if found is not None:
            return found, f"{conversation.name} (template {template!r})"
        return None, f"{conversation.name} defines no template {template!r}"
    return None, "the checkpoint has no conversation.py"


def _const_str(node: ast.AST) -> str | None:
    """A string literal, including ``'a' 'b'`` and ``'a' + 'b'`` concatenations."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _const_str(node.left), _const_str(node.right)
        if left is not None and right is not None:
            return left + right
    return None


def _parse(source: str) -> ast.AST | None:
    try:
        return ast.parse(source)
    except SyntaxError:
        return None


def _literal_self_assignment(source: str, attribute: str) -> str | None:
    tree = _parse(source)
    if tree is None:
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if (
                    isinstance(target, ast.Attribute)
                    and target.attr == attribute
                    and isinstance(target.value, ast.Name)
                    and target.value.id == "self"
                ):
                    value = _const_str(node.value)
                    if value is not None:
                        return value
    return None


def _conversation_system_message(source: str, template: str) -> str | None:
    tree = _parse(source)
    if tree is None:
        return None
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Conversation"
        ):
            kwargs = {kw.arg: kw.value for kw in node.keywords if kw.arg}
            if "name" in kwargs and _const_str(kwargs["name"]) == template:
                if "system_message" not in kwargs:
                    return ""
                return _const_str(kwargs["system_message"])
    return None
