"""Original-format InternVL checkpoint → transformers-native checkpoint, streamed shard by shard.

The output is what ``InternVLForConditionalGeneration.save_pretrained`` writes (keys under
``vision_tower.``, ``multi_modal_projector.``, ``language_model.model.``, ``language_model.lm_head.``;
``model-XXXXX-of-YYYYY.safetensors`` shards with ``model.safetensors.index.json``) plus the tokenizer,
``generation_config.json`` and the tiling settings in ``preprocessor_config.json``. Two keys that
transformers does not define are added at the top level of ``config.json`` and survive its load/save
round trip: ``ps_version`` (``v1``/``v2``: the pixel-shuffle order the mesh's encoder must use;
transformers itself always applies v2) and ``template`` (the original conversation template name).

Memory stays bounded by one input shard: tensors are read lazily (``safe_open``), converted one at a
time (every conversion is local to one tensor) and each input shard becomes one output shard. The
output is assembled in a sibling temporary directory and renamed into place only once complete.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.errors import FailedPrecondition, InvalidArgument
from services.convert.llm import LLM_PREFIX, LlmFamily, family_for
from services.convert.original import OriginalCheckpoint, open_original, read_system_message
from services.convert.templates import CONTEXT_PLACEHOLDER, chat_template_jinja, get_template
from services.convert.tokenizer import IMAGE_TOKENS, convert_tokenizer
from services.convert.vision import (
    PROJECTOR_PREFIX,
    VISION_PREFIX,
    convert_projector_tensor,
    convert_vision_tensor,
    native_vision_config,
)

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"

DTYPES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}

IMAGE_MEAN = [0.485, 0.456, 0.406]
IMAGE_STD = [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class ConversionReport:
    dst: Path
    llm_architecture: str
    native_text_model_type: str
    template: str
    ps_version: str
    system_message_source: str
    dtype: str
    tensors: int
    shards: int
    refusals: tuple[str, ...] = ()  # why the mesh would refuse the output (written anyway with force)


def parse_dtype(dtype: str | None):
    """``None`` keeps the checkpoint's dtype; otherwise a torch floating dtype."""
    if dtype is None:
        return None
    import torch

    name = DTYPES.get(dtype.lower())
    if name is None:
        raise InvalidArgument(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return getattr(torch, name)


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    force: bool = False,
) -> ConversionReport:
    """Convert ``src`` (original layout) into ``dst`` (transformers-native layout).

    An output that the mesh's encoder or decoder would refuse is not written (``FailedPrecondition``
    with every reason); with ``force`` it is, and the report lists the reasons.
    """
    src, dst = Path(src), Path(dst)
    target_dtype = parse_dtype(dtype)
    if dst.exists() and not overwrite:
        raise FailedPrecondition(f"{dst} exists; pass overwrite to replace it", reason="destination_exists")
    if dst.resolve() == src.resolve():
        raise InvalidArgument("the destination must differ from the source")

    original = open_original(src)
    family = family_for(original.llm_architecture)
    try:
        template = get_template(original.template)
    except InvalidArgument as exc:
        raise FailedPrecondition(exc.message, reason="unsupported_layout") from None
    system_message, source = read_system_message(src, original.template)
    if system_message is None:
        log.warning("%s; using the built-in system message of template %r", source, template.name)
        system_message, source = template.system_message, f"built-in ({source})"

    # Image parts render as the context token, the convention of transformers' -hf checkpoints, so
    # one prompt path in the decoder serves native and converted checkpoints alike; the decoder expands
    # each to <img> + <IMG_CONTEXT> x (256 * tiles) + </img>, exactly what chat() makes of <image>.
    tokenizer = convert_tokenizer(
        src,
        family.tokenizer_kind,
        chat_template_jinja(template.name, system_message, image_placeholder=CONTEXT_PLACEHOLDER),
    )
    config = build_native_config(original, family, tokenizer)
    expected = expected_shapes(config)

    tmp = dst.with_name(f".{dst.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        written, seen_dtype = _write_weights(original, family, config, expected, tmp, target_dtype, progress)
        config.dtype = target_dtype or seen_dtype
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_generation_config(tmp, config, tokenizer, template.stop_str)
        _write_processor_files(tmp, original)
        refused = _check_servable(tmp, dst, force)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConversionReport(
        dst=dst,
        llm_architecture=original.llm_architecture,
        native_text_model_type=config.text_config.model_type,
        template=template.name,
        ps_version=original.ps_version,
        system_message_source=source,
        dtype=str(config.dtype).removeprefix("torch."),
        tensors=written,
        shards=len(original.shards),
        refusals=tuple(refused),
    )


def serve_refusals(path: Path) -> list[str]:
    """Why the mesh's encoder and decoder would refuse the native checkpoint at ``path`` when served as
    ``internvl-mesh serve --model`` serves it by default on CPU (the services' own support checks,
    with the configs their replicas build); empty when both can serve it."""
    from services.common.checkpoint import support_refusals
    from services.common.config import ModelConfig
    from services.decoder import support as decoder_support
    from services.decoder.config import DecoderAppArgs
    from services.encoder import support as encoder_support
    from services.encoder.config import EncoderAppArgs

    model = ModelConfig(name="converted", path=str(path))
    encoder = EncoderAppArgs(model=model).encoder_config("cpu", "")
    decoder = DecoderAppArgs(model=model).decoder_config("cpu")
    return support_refusals(
        path,
        {
            "encoder": lambda ckpt: encoder_support.check_checkpoint(ckpt, encoder),
            "decoder": lambda ckpt: decoder_support.check_checkpoint(ckpt, decoder),
        },
    )


def _check_servable(tmp: Path, dst: Path, force: bool) -> list[str]:
    """The reasons the mesh would refuse the output assembled in ``tmp`` (named as ``dst``); raises
    ``FailedPrecondition`` with them unless ``force``."""
    refused = [r.replace(str(tmp), str(dst)) for r in serve_refusals(tmp)]
    if refused and not force:
        raise FailedPrecondition(
            f"not writing {dst}: the mesh could not serve it:\n"
            + "\n".join(f"  {r}" for r in refused)
            + "\n(convert with force, --force on the command line, to write it anyway)",
            reason="checkpoint_unservable",
        )
    return refused


def build_native_config(original: OriginalCheckpoint, family: LlmFamily, tokenizer):
    """The ``InternVLConfig`` for ``original``, with ``ps_version`` and ``template`` added."""
    from transformers import InternVLConfig

    text = family.text_config(original.llm_config)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["context_image_token"])
    if image_token_id >= int(text["vocab_size"]):
        raise FailedPrecondition(
            f"<IMG_CONTEXT> has id {image_token_id}, outside the LLM's vocabulary of {text['vocab_size']}",
            reason="unsupported_layout",
        )
    config = InternVLConfig(
        vision_config=native_vision_config(original.vision_config),
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=original.image_seq_length,
        downsample_ratio=original.downsample_ratio,
        vision_feature_layer=original.select_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
    )
    config.architectures = ["InternVLForConditionalGeneration"]
    config.ps_version = original.ps_version
    config.template = original.template
    return config


def _saved_name(internal: str) -> str:
    """A parameter name inside ``InternVLForConditionalGeneration`` → its key in saved files."""
    for inner, saved in (
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ):
        if internal.startswith(inner):
            return saved + internal[len(inner) :]
    raise AssertionError(f"unmapped parameter {internal}")


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Saved key → shape of every tensor the native model loads (built on the meta device)."""
    import torch
    from transformers import InternVLForConditionalGeneration

    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    shapes = {_saved_name(n): tuple(t.shape) for n, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("language_model.lm_head.weight", None)
    return shapes


def _converter_for(name: str, family: LlmFamily, config) -> Callable[[str, Any], list[tuple[str, Any]]]:
    if name.startswith(VISION_PREFIX):
        return lambda n, t: convert_vision_tensor(n, t, config.vision_config.hidden_size)
    if name.startswith(PROJECTOR_PREFIX):
        return convert_projector_tensor
    if name.startswith(LLM_PREFIX):
        text = config.text_config.to_dict()
        return lambda n, t: family.convert_tensor(n, t, text)
    raise FailedPrecondition(
        f"tensor {name!r} is outside vision_model.*, mlp1.* and language_model.*", reason="unsupported_layout"
    )


def _write_weights(original, family, config, expected, out_dir: Path, target_dtype, progress: bool):
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    n = len(original.shards)
    total = (
        sum(len(original.shard_keys(s)) for s in original.shards)
        if original.weight_format == "safetensors"
        else None
    )
    weight_map: dict[str, str] = {}
    total_size = total_params = 0
    seen_dtype = None
    tie = config.tie_word_embeddings
    with tqdm(total=total, desc="Converting tensors", unit="tensor", disable=not progress) as bar:
        for i, shard in enumerate(original.shards, start=1):
            shard_name = f"model-{i:05d}-of-{n:05d}.safetensors"
            tensors: dict[str, Any] = {}
            for name, tensor in original.iter_tensors(shard):
                for out_name, out in _converter_for(name, family, config)(name, tensor):
                    if tie and out_name == "language_model.lm_head.weight":
                        continue  # tied to the embeddings: save_pretrained does not write it either
                    if out_name not in expected:
                        raise FailedPrecondition(
                            f"{name} maps to {out_name}, which the native model does not have",
                            reason="unsupported_layout",
                        )
                    if tuple(out.shape) != expected[out_name]:
                        raise FailedPrecondition(
                            f"{name} → {out_name}: shape {tuple(out.shape)}, the config implies "
                            f"{expected[out_name]}",
                            reason="unsupported_layout",
                        )
                    if out_name in weight_map or out_name in tensors:
                        raise FailedPrecondition(f"{out_name} is produced twice", reason="unsupported_layout")
                    if out.is_floating_point():
                        seen_dtype = seen_dtype or out.dtype
                        if target_dtype is not None:
                            out = out.to(target_dtype)
                    if original.weight_format == "bin":
                        # torch.load keeps storage sharing (tied weights), which safetensors refuses.
                        out = out.clone()
                    tensors[out_name] = out.contiguous()
                bar.update(1)
            if tensors:
                save_file(tensors, str(out_dir / shard_name), metadata={"format": "pt"})
                for out_name, t in tensors.items():
                    weight_map[out_name] = shard_name
                    total_size += t.numel() * t.element_size()
                    total_params += t.numel()
            del tensors
    missing = sorted(set(expected) - set(weight_map))
    if missing:
        raise FailedPrecondition(
            f"the checkpoint lacks {len(missing)} tensors the native model needs, e.g. {missing[:5]}",
            reason="unsupported_layout",
        )
    index = {
        "metadata": {"total_size": total_size, "total_parameters": total_params},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return len(weight_map), seen_dtype or torch.float32


def _write_generation_config(out_dir: Path, config, tokenizer, stop_str: str) -> None:
    """Stop on the template separator, as ``chat()`` does (``eos_token_id`` = its token)."""
    from transformers import GenerationConfig

    stop_id = tokenizer.convert_tokens_to_ids(stop_str)
    if stop_id is None or stop_id == tokenizer.unk_token_id:
        raise FailedPrecondition(f"the tokenizer has no token for the stop string {stop_str!r}")
    GenerationConfig(
        eos_token_id=stop_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=config.text_config.bos_token_id,
        do_sample=False,
    ).save_pretrained(out_dir)


def _write_processor_files(out_dir: Path, original: OriginalCheckpoint) -> None:
    """Tiling settings where transformers-native checkpoints keep them (GotOcr2 image processor)."""
    tiling = original.tiling()
    preprocessor = {
        "image_processor_type": "GotOcr2ImageProcessorFast",
        "crop_to_patches": tiling["dynamic_image_size"],
        "min_patches": tiling["min_dynamic_patch"],
        "max_patches": tiling["max_dynamic_patch"],
        "use_thumbnail": tiling["use_thumbnail"],
        "size": {"height": original.image_size, "width": original.image_size},
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "do_convert_rgb": True,
        "processor_class": "InternVLProcessor",
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    processor = {"image_seq_length": original.image_seq_length, "processor_class": "InternVLProcessor"}
    (out_dir / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
