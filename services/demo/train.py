"""Train the demo model: InternViT + pixel shuffle + MLP projector + a small Qwen2, from scratch.

``internvl-mesh train-demo OUT`` runs it. Seeded: the data of step ``s`` come from ``Random(f"{seed}:{s}")``
(stage 0: ``f"{seed}:vision:{s}"``) and the initial weights from ``torch.manual_seed(seed)``, so a rerun
with the same seed, steps and torch build gives the same weights. The run writes OUT (a native InternVL
checkpoint) every ``save_every`` steps and at the end, and ``OUT.train_log.jsonl`` beside it.

Stages (``docs/demo-model.md`` has the runs behind them):

0. the vision tower alone, with dense per-patch shape and colour labels (``services.demo.pretrain``);
1. projector and language model on question answering (the tower frozen unless ``vision_lr_scale``),
   up to :data:`TURNS` questions per image as one conversation: first single-tile images of one shape
   (short sequences, nothing to bind), then at most two shapes, then all three kinds, with more weight
   on corners, whose answer needs the LLM to pick the right 64-token block by position.
"""

from __future__ import annotations

import json
import math
import queue
import random
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from services.common.tiny_checkpoint import (
    Preset,
    build_config,
    image_seq_length,
    save_checkpoint,
    train_tokenizer,
)
from services.demo.inputs import PromptCodec, answer_matches, collate, encode_sample
from services.demo.pretrain import pretrain_vision, sincos_position_embeddings
from services.demo.task import HELDOUT_GROUPS, all_questions, heldout, make_sample

# vision 96 wide x 3 layers; LLM 128 wide x 4 layers (4 query heads, 2 KV heads); ~1.95 M parameters
DEMO_PRESET = Preset(96, 3, 3, 384, 128, 4, 4, 2, 512, 8192)
DEMO_PATCH = 14  # InternViT's own: a 448 tile is 32 x 32 patches
DEMO_DOWNSAMPLE = 0.25  # pixel shuffle merges 4 x 4 patches: 64 image tokens per tile (InternVL: 2 x 2, 256)
DEMO_TOKENS_PER_TILE = image_seq_length(DEMO_PATCH, DEMO_DOWNSAMPLE)
DEMO_ROPE_THETA = 10_000.0  # positions of a few thousand tokens; the corner task addresses 256-token blocks

TURNS = 8  # questions per image, as one conversation (the first is the one a request would ask)


@dataclass
class TrainConfig:
    steps: int = 2000
    vision_steps: int = 400  # stage 0 (services.demo.pretrain)
    seed: int = 0
    lr: float = 2e-3
    vision_lr_scale: float = 0.0  # the stage-0 tower's learning rate in stage 1, relative (0: frozen)
    warmup: int = 100
    weight_decay: float = 0.01
    single_only_steps: int = 200
    one_shape_steps: int = 200  # scenes of one shape first: reading a shape before binding it to a colour
    two_shape_steps: int = 500  # then at most two
    batch_tiles: int = 24  # images per step: as many as fit in about this many 448 tiles
    save_every: int = 250
    eval_every: int = 250
    eval_per_group: int = 8
    threads: int = 0  # 0: torch's default


def kind_weights(step: int, cfg: TrainConfig) -> dict[str, float]:
    if step < cfg.single_only_steps:
        return {"single": 1.0}
    return {"single": 0.3, "multi": 0.3, "corners": 0.4}


def max_shapes_at(step: int, cfg: TrainConfig) -> int | None:
    if step < cfg.one_shape_steps:
        return 1
    return 2 if step < cfg.two_shape_steps else None


def batch_for(step: int, cfg: TrainConfig, codec: PromptCodec):
    rng = random.Random(f"{cfg.seed}:{step}")
    weights = kind_weights(step, cfg)
    kind = rng.choices(list(weights), weights=list(weights.values()))[0]
    encoded, tiles = [], 0
    while True:
        sample = make_sample(rng, kind, max_shapes=max_shapes_at(step, cfg))
        more = [qa for qa in all_questions(sample) if qa[0] != sample.question]
        rng.shuffle(more)
        e = encode_sample(codec, sample, more[: TURNS - 1])
        if encoded and tiles + len(e.tiles) > cfg.batch_tiles:
            break
        encoded.append(e)
        tiles += len(e.tiles)
    return kind, collate(codec, encoded)


def build_model(seed: int):
    from transformers import InternVLForConditionalGeneration

    tokenizer = train_tokenizer()
    config = build_config(
        DEMO_PRESET, "qwen2", tokenizer, patch_size=DEMO_PATCH, downsample_ratio=DEMO_DOWNSAMPLE
    )
    config.vision_config.layer_scale_init_value = 1.0  # residual branches at full strength from the start
    config.text_config.rope_theta = DEMO_ROPE_THETA
    if hasattr(config.text_config, "rope_parameters") and config.text_config.rope_parameters:
        config.text_config.rope_parameters["rope_theta"] = DEMO_ROPE_THETA
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    sincos_position_embeddings(model.model.vision_tower)
    return model, tokenizer


@torch.no_grad()
def quick_eval(model, codec: PromptCodec, per_group: int) -> dict[str, float]:
    """Teacher-forced exact match (equal to greedy ``generate``) on the first samples of each group."""
    model.eval()
    samples = heldout(per_group)
    out: dict[str, float] = {}
    for g, (kind, qtype) in enumerate(HELDOUT_GROUPS):
        group = samples[g * per_group : (g + 1) * per_group]
        hits = 0
        for i in range(0, len(group), 4):
            batch = collate(codec, [encode_sample(codec, s) for s in group[i : i + 4]])
            labels = batch.pop("labels")
            logits = model(**batch).logits
            hits += int(answer_matches(logits, labels).sum())
        out[f"{kind}/{qtype}"] = hits / len(group)
    model.train()
    return out


def train(out_dir: str | Path, cfg: TrainConfig, log=print) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tokenizer = build_model(cfg.seed)
    codec = PromptCodec(tokenizer, model.config.image_seq_length)
    params = sum(p.numel() for p in model.parameters())
    groups: dict[tuple[bool, bool], list] = {}
    for n, p in model.named_parameters():
        if "vision_tower" in n and not cfg.vision_lr_scale:
            continue  # stage 1 keeps the stage-0 tower as it is (frozen below, after stage 0)
        groups.setdefault((p.dim() >= 2 and "embed" not in n, "vision_tower" in n), []).append(p)
    opt = torch.optim.AdamW(
        [
            {
                "params": ps,
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "scale": cfg.vision_lr_scale if vision else 1.0,
            }
            for (decay, vision), ps in groups.items()
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    # batches are built on a thread (Pillow and numpy release the GIL) while the model trains
    batches: queue.Queue = queue.Queue(maxsize=4)

    def produce():
        for step in range(cfg.steps):
            batches.put(batch_for(step, cfg, codec))

    threading.Thread(target=produce, daemon=True, name="demo-batches").start()

    log_path = out.parent / f"{out.name}.train_log.jsonl"
    log_file = log_path.open("w")
    started = time.monotonic()
    if cfg.vision_steps:
        pretrain_vision(
            model.model.vision_tower,
            cfg.vision_steps,
            cfg.seed,
            log=log,
            record=lambda r: log_file.write(json.dumps(r) + "\n"),
        )
    if not cfg.vision_lr_scale:
        model.model.vision_tower.requires_grad_(False)  # and autograd skips its backward
    ema: dict[str, float] = {}
    model.train()
    provenance = {"origin": "train-demo", "config": asdict(cfg), "parameters": params}
    log(f"training {params / 1e6:.2f} M parameters for {cfg.steps} steps; log {log_path}")
    for step in range(cfg.steps):
        kind, batch = batches.get()
        for group in opt.param_groups:
            group["lr"] = lr_at(step) * group["scale"]
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        ema[kind] = 0.95 * ema.get(kind, value) + 0.05 * value
        record = {
            "step": step,
            "kind": kind,
            "loss": round(value, 4),
            "elapsed_s": round(time.monotonic() - started, 1),
        }
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record["eval"] = quick_eval(model, codec, cfg.eval_per_group)
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        if step % 25 == 0 or "eval" in record:
            smooth = " ".join(f"{k}={v:.3f}" for k, v in sorted(ema.items()))
            log(f"step {step} {record['elapsed_s']}s lr {lr_at(step):.2e} {smooth} {record.get('eval', '')}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            provenance["steps_done"] = step + 1
            provenance["train_seconds"] = round(time.monotonic() - started)
            save_checkpoint(model.eval(), tokenizer, out, provenance)
            model.train()
    log_file.close()
    return out
