"""Reading a transformers-native InternVL checkpoint, one component at a time.

The encoder needs only the vision tower and the projector; the decoder only the language model. This
module reads ``config.json`` and the safetensors index, and loads the tensors of one component without
materialising anything else: ``safe_open`` reads a tensor's bytes only when that key is asked for, and
every key read is recorded in ``Checkpoint.keys_read`` so a test can prove that the encoder never touches
a language-model tensor. ``SliceReader`` reads parts of tensors (rows, columns): a tensor-parallel rank
materialises its own shard of each weight and nothing else.

Checkpoint key names differ between transformers releases (``language_model.model.*`` in the files
transformers 5 writes, ``model.language_model.*`` in some hub repositories, ``lm_head.*`` or
``language_model.lm_head.*``). Callers ask for a component and get canonical, prefix-free names.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.errors import FailedPrecondition, InvalidArgument, MeshError, NotFound

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Prefixes under which each component is stored, in the order they are tried.
COMPONENT_PREFIXES: dict[str, tuple[str, ...]] = {
    "vision": ("vision_tower.", "model.vision_tower."),
    "projector": ("multi_modal_projector.", "model.multi_modal_projector."),
    "language_model": ("language_model.model.", "model.language_model.", "language_model."),
    "lm_head": ("language_model.lm_head.", "lm_head."),
}


def resolve_checkpoint_dir(model: str | Path, *, allow_download: bool = False) -> Path:
    """A local directory as given, or a hub id resolved through the local Hugging Face cache.

    With ``allow_download`` a hub id may be fetched (where there is network); by default only what is
    already on disk is used, so nothing in tests or CI ever downloads.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise NotFound(f"checkpoint directory {text!r} does not exist", reason="checkpoint_missing")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                text,
                local_files_only=not allow_download,
                allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"],
            )
        )
    except Exception as exc:  # huggingface_hub raises several unrelated types here
        hint = "" if allow_download else " (downloads are disabled: pass a local directory)"
        raise NotFound(f"cannot resolve model {text!r}{hint}: {exc}", reason="checkpoint_missing") from exc


@dataclass
class Checkpoint:
    """A native InternVL checkpoint on disk. Open with :meth:`open`."""

    path: Path
    config: dict[str, Any]
    weight_map: dict[str, str]  # tensor key -> shard file name
    keys_read: set[str] = field(default_factory=set)
    _identity: str | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, model: str | Path, *, allow_download: bool = False) -> Checkpoint:
        path = resolve_checkpoint_dir(model, allow_download=allow_download)
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            raise NotFound(f"{path} has no {CONFIG_FILE}", reason="checkpoint_missing")
        try:
            config = json.loads(config_path.read_text("utf-8"))
        except json.JSONDecodeError as exc:
            raise FailedPrecondition(f"{config_path} is not valid JSON: {exc}") from exc
        model_type = config.get("model_type")
        if model_type != "internvl":
            hint = (
                " (an original-format InternVL checkpoint: run `internvl-mesh convert SRC DST` first)"
                if model_type == "internvl_chat"
                else ""
            )
            raise FailedPrecondition(
                f"{path} is not a transformers-native InternVL checkpoint: model_type={model_type!r}{hint}",
                reason="checkpoint_not_internvl",
            )
        for key in ("vision_config", "text_config"):
            if not isinstance(config.get(key), dict):
                raise FailedPrecondition(f"{config_path} lacks {key}", reason="checkpoint_config_invalid")
        return cls(path=path, config=config, weight_map=_read_weight_map(path))

    # -- config views -------------------------------------------------------------------------
    @property
    def text_config(self) -> dict[str, Any]:
        return self.config["text_config"]

    @property
    def vision_config(self) -> dict[str, Any]:
        return self.config["vision_config"]

    @property
    def ps_version(self) -> str:
        """Pixel-shuffle order: ``v2`` (row-major, transformers' only one) unless the config says ``v1``."""
        return str(self.config.get("ps_version", "v2"))

    def hf_config(self):
        """The transformers ``InternVLConfig`` (imports transformers)."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path)

    def read_json(self, name: str) -> dict[str, Any] | None:
        p = self.path / name
        return json.loads(p.read_text("utf-8")) if p.is_file() else None

    def max_dynamic_patch(self, default: int = 12) -> int:
        pre = self.read_json("preprocessor_config.json") or {}
        return int(self.config.get("max_dynamic_patch", pre.get("max_patches", default)))

    def identity(self) -> str:
        """A string naming these weights, for cache keys, computed from content (not paths or mtimes).

        Replicas holding separate copies of one checkpoint must agree (so they share cache entries),
        and two checkpoints with the same shapes but other weights must differ. The digest covers
        config.json, every shard's safetensors header (names, dtypes, shapes, offsets) and 64 KiB
        samples of its data every 32 MiB plus its last 64 KiB: cheap at start-up even for a 50 GB model.
        """
        import hashlib

        if self._identity is not None:
            return self._identity
        h = hashlib.sha256((self.path / CONFIG_FILE).read_bytes())
        for shard in sorted(set(self.weight_map.values())):
            h.update(shard.encode())
            with open(self.path / shard, "rb") as f:
                size = f.seek(0, 2)
                f.seek(0)
                header_len = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(header_len, 100 * 1024 * 1024)))
                for offset in [*range(8 + header_len, size, 32 << 20), max(size - (64 << 10), 0)]:
                    f.seek(offset)
                    h.update(f.read(64 << 10))
        self._identity = f"{self.path.name}@{h.hexdigest()[:16]}"
        return self._identity

    # -- tensors ------------------------------------------------------------------------------
    def component_keys(self, component: str) -> dict[str, str]:
        """Canonical name -> stored key for one component (see ``COMPONENT_PREFIXES``)."""
        if component not in COMPONENT_PREFIXES:
            raise InvalidArgument(f"unknown component {component!r}; one of {sorted(COMPONENT_PREFIXES)}")
        for prefix in COMPONENT_PREFIXES[component]:
            found = {
                key[len(prefix) :]: key
                for key in self.weight_map
                if key.startswith(prefix) and not _belongs_elsewhere(key, component)
            }
            if found:
                return found
        return {}

    def require_component(self, component: str) -> dict[str, str]:
        """``component_keys``, or ``FailedPrecondition`` where the checkpoint has none of them (reads
        only the index: the loaders and the support checks before start-up call it alike)."""
        keys = self.component_keys(component)
        if not keys:
            raise FailedPrecondition(
                f"checkpoint {self.path} has no {component} weights", reason="checkpoint_incomplete"
            )
        return keys

    def load_component(self, component: str, dtype=None, device="cpu") -> dict[str, Any]:
        """Load one component's tensors (canonical names), reading no other tensor."""
        if component == "lm_head" and not self.component_keys(component):
            return {}  # tied to the input embeddings; the caller handles it
        return self.load_keys(self.require_component(component), dtype=dtype, device=device)

    def load_keys(self, names_to_keys: dict[str, str], dtype=None, device="cpu") -> dict[str, Any]:
        from safetensors import safe_open

        by_shard: dict[str, list[tuple[str, str]]] = {}
        for name, key in names_to_keys.items():
            by_shard.setdefault(self.weight_map[key], []).append((name, key))
        out = {}
        for shard, items in by_shard.items():
            with safe_open(str(self.shard_path(shard)), framework="pt", device=str(device)) as f:
                for name, key in items:
                    tensor = f.get_tensor(key)
                    out[name] = (
                        tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)
                    )
                    self.record_read(key)
        return out

    def shard_path(self, shard: str) -> Path:
        path = self.path / shard
        if not path.is_file():
            raise FailedPrecondition(
                f"shard {shard} listed in the index is missing from {self.path}",
                reason="checkpoint_incomplete",
            )
        return path

    def record_read(self, key: str) -> None:
        with self._lock:
            self.keys_read.add(key)


class SliceReader:
    """Reads parts of one component's tensors (canonical names), materialising only the rows and
    columns asked for (``safe_open(...).get_slice``): a tensor-parallel rank reads its own shard of
    each weight, never a whole tensor it shards, and never the whole model. ``bytes_read`` counts
    the bytes materialised. A context manager: the shard files stay open until it exits.
    """

    def __init__(self, checkpoint: Checkpoint, component: str):
        self.checkpoint = checkpoint
        self.names = checkpoint.require_component(component)  # canonical name -> stored key
        self.component = component
        self.bytes_read = 0
        self._files: dict[str, Any] = {}
        self._stack = ExitStack()

    def __enter__(self) -> SliceReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self._files.clear()
        self._stack.close()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, rows: slice = slice(None), cols: slice | None = None):
        """Rows ``rows`` (and columns ``cols``) of tensor ``name``, as stored (dtype included)."""
        part = self._slice(name)
        tensor = part[rows] if cols is None else part[rows, cols]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def _slice(self, name: str):
        key = self.names.get(name)
        if key is None:
            raise FailedPrecondition(
                f"checkpoint {self.checkpoint.path} has no {self.component} tensor {name!r}",
                reason="checkpoint_incomplete",
            )
        shard = self.checkpoint.weight_map[key]
        f = self._files.get(shard)
        if f is None:
            from safetensors import safe_open

            path = self.checkpoint.shard_path(shard)
            f = self._files[shard] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        self.checkpoint.record_read(key)
        return f.get_slice(key)


def support_refusals(path: str | Path, checks: dict[str, Callable[[Checkpoint], None]]) -> list[str]:
    """Why the services named in ``checks`` (service -> its support check, e.g. the decoder's
    ``services.decoder.support.check_checkpoint`` with its config) cannot serve the checkpoint at
    ``path``: one ``"service: reason"`` line per refusing service, or the reason the checkpoint cannot
    be opened at all; empty when every service can serve it."""
    try:
        ckpt = Checkpoint.open(path)
    except MeshError as exc:
        return [exc.message]
    found = []
    for service, check in checks.items():
        try:
            check(ckpt)
        except MeshError as exc:
            found.append(f"{service}: {exc.message}")
    return found


def _belongs_elsewhere(key: str, component: str) -> bool:
    # "language_model." is a fallback prefix for the LLM; it must not swallow the LM head.
    return component == "language_model" and ".lm_head." in f".{key}"


def _read_weight_map(path: Path) -> dict[str, str]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise FailedPrecondition(f"{index} is not a safetensors index: {exc}") from exc
        return dict(weight_map)
    single = path / SINGLE_FILE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    if any(path.glob("*.bin")):
        raise FailedPrecondition(
            f"{path} holds only PyTorch .bin weights; convert them to safetensors", reason="checkpoint_format"
        )
    raise NotFound(
        f"{path} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})", reason="checkpoint_missing"
    )
