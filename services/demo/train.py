"""Train the demo model: InternViT + pixel shuffle + MLP projector + a small Qwen2, from scratch.

``internvl-mesh train-demo OUT`` runs it. Seeded: the data of step ``s`` come from ``Random(f"{seed}:{s}")``
(stage 0: ``f"{seed}:vision:{s}"``) and the initial weights from ``torch.manual_seed(seed)``, so a rerun
with the same seed, steps and torch build gives the same weights. The run writes OUT (a native InternVL
checkpoint) every ``save_every`` steps and at the end, and ``OUT.train_log.jsonl`` beside it.

Stages (``docs/demo-model.md`` has the runs behind them):

0. the vision tower alone, with dense per-patch shape and colour labels (``services.demo.pretrain``);
1. the tower frozen, a seeded pool of images (``f"{seed}:pool:{i}"``) goes through it once
   (``services.demo.pool``); then the projector and the language model learn from the stored output
   to answer several questions per image as one conversation (``task.training_questions``: none
   answerable from the others' text), and to ground every image
   token (``services.demo.grounding``): its shape, colour and tile, read by a throwaway head from the
   hidden states after :data:`GROUNDING_LAYER` layers. First single-tile images of one shape (short
   sequences, nothing to bind), then at most two shapes, then all three kinds, with more weight on
   corners, whose answer needs the LLM to pick the right 64-token block by position.
"""

from __future__ import annotations

import functools
import json
import math
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from services.common.tiny_checkpoint import (
    Preset,
    build_config,
    image_seq_length,
    save_checkpoint,
    train_tokenizer,
)
from services.demo.grounding import CHECKER, NUM_SHAPES, SLOTS, UNLABELLED, pointer_targets
from services.demo.inputs import Encoded, PromptCodec, answer_matches, collate, encode_sample, encode_turns
from services.demo.pool import PoolImage, build_pool, stored_features
from services.demo.pretrain import pretrain_vision, sincos_position_embeddings
from services.demo.task import HELDOUT_GROUPS, heldout, training_questions

# vision 96 wide x 3 layers; LLM 128 wide x 4 layers (4 query heads, 2 KV heads); ~1.95 M parameters
DEMO_PRESET = Preset(96, 3, 3, 384, 128, 4, 4, 2, 512, 8192)
DEMO_PATCH = 14  # InternViT's own: a 448 tile is 32 x 32 patches
DEMO_DOWNSAMPLE = 0.25  # pixel shuffle merges 4 x 4 patches: 64 image tokens per tile (InternVL: 2 x 2, 256)
DEMO_TOKENS_PER_TILE = image_seq_length(DEMO_PATCH, DEMO_DOWNSAMPLE)
DEMO_ROPE_THETA = 10_000.0  # positions of a few thousand tokens; the corner task addresses 256-token blocks

GROUNDING_LAYER = 2  # the grounding head reads the language model's hidden states after this many layers
GROUNDING_SHAPE_WEIGHTS = (0.2, 1.0, 1.0, 1.0, 1.0)  # most image tokens show background
# the attention head taught to point from an answer's position at the image tokens that hold it
POINTER_LAYER, POINTER_HEAD = 2, 0
# the readout objective: the answer read through the final norm and the LM head from the hidden state
# at the answer's position right after the pointer's layer (what the pointer fetched must be the answer)
READOUT_STATES = POINTER_LAYER + 1


@dataclass
class TrainConfig:
    steps: int = 6000
    vision_steps: int = 800  # stage 0 (services.demo.pretrain)
    vision_from: str = ""  # a train-demo output of the same seed and vision_steps: its tower, stage 0 skipped
    seed: int = 0
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    pool_tiles: int = 20_000  # stage 1's images, through the frozen tower once (services.demo.pool)
    grounding_weight: float = 0.5  # of the grounding objective (services.demo.grounding); 0: answers only
    pointer_weight: float = 0.5  # of the pointer objective (POINTER_HEAD's attention); 0: none
    readout_weight: float = 0.5  # of the readout objective (READOUT_STATES); 0: none
    grid_swap: float = 0.5  # share of multi-tile scenes whose grid tiles come from another scene
    single_only_steps: int = 300
    one_shape_steps: int = 300  # scenes of one shape first: reading a shape before binding it to a colour
    two_shape_steps: int = 1200  # then at most two
    batch_tiles: int = 24  # images per step: as many as fit in about this many 448 tiles
    save_every: int = 500
    eval_every: int = 500
    eval_per_group: int = 8
    threads: int = 0  # 0: torch's default


def kind_weights(step: int, cfg: TrainConfig) -> dict[str, float]:
    if step < cfg.single_only_steps:
        return {"single": 1.0}
    return {"single": 0.3, "multi": 0.3, "corners": 0.4}


def max_shapes_at(step: int, cfg: TrainConfig) -> int:
    if step < cfg.one_shape_steps:
        return 1
    return 2 if step < cfg.two_shape_steps else 4


class PoolIndex:
    """The pool's images by kind and shape count, for the curriculum's draws."""

    def __init__(self, pool: list[PoolImage]):
        self.pool = pool
        self._by: dict[tuple[str, int], list[int]] = {}
        self.scenes_by_tiles: dict[int, list[int]] = {}  # multi-tile scenes by tile count
        for i, image in enumerate(pool):
            kind = image.sample.kind
            if kind == "multi":
                self.scenes_by_tiles.setdefault(len(image.features), []).append(i)
            for limit in (1, 2, 4):
                if kind == "corners" or len(image.sample.layout) <= limit:
                    self._by.setdefault((kind, limit), []).append(i)

    def choices(self, kind: str, max_shapes: int) -> list[int]:
        return self._by.get((kind, max_shapes)) or self._by[(kind, 4)]


def batch_for(step: int, cfg: TrainConfig, codec: PromptCodec, index: PoolIndex):
    """Step ``step``'s batch: pooled images of one kind, fresh questions about each, with
    the stored tower output as ``pixel_values`` and the grounding labels of every image token."""
    rng = random.Random(f"{cfg.seed}:{step}")
    weights = kind_weights(step, cfg)
    kind = rng.choices(list(weights), weights=list(weights.values()))[0]
    candidates = index.choices(kind, max_shapes_at(step, cfg))
    encoded: list[Encoded] = []
    grounding: list = []
    pointers: list[tuple[int, int, np.ndarray]] = []  # (row, query position, target positions)
    tiles = 0
    answers: list[tuple[int, int]] = []  # (row, query position) of every answer token
    while True:
        chosen = rng.choice(candidates)
        image = index.pool[chosen]
        turns = training_questions(image.sample, rng)
        ids, labels = encode_turns(codec, len(image.features), turns)
        if encoded and tiles + len(image.features) > cfg.batch_tiles:
            break
        labels_here = image.grounding.reshape(3, -1)
        image_positions = np.flatnonzero(np.asarray(ids) == codec.context_id)
        for (question, _), queries in zip(turns, answer_positions(labels), strict=True):
            answers += [(len(encoded), q) for q in queries]
            hit = pointer_targets(question, labels_here)
            if hit is not None:
                pointers += [(len(encoded), q, image_positions[hit]) for q in queries]
        features = image.features
        if kind == "multi" and rng.random() < cfg.grid_swap:
            # The grid tiles of another scene with the same tiling: their pieces of shapes say nothing
            # about this scene, so the answers must come from the thumbnail (the drop_thumbnail mutation
            # then leaves nothing to answer from). Grid tokens have no shape or colour labels to change.
            others = [i for i in index.scenes_by_tiles[len(features)] if i != chosen]
            if others:
                features = np.concatenate([index.pool[rng.choice(others)].features[:-1], features[-1:]])
        encoded.append(Encoded(ids, labels, features))
        grounding.append(labels_here)
        tiles += len(image.features)
    batch = collate(codec, encoded)
    batch["grounding"] = torch.from_numpy(np.concatenate(grounding, axis=1).astype(np.int64))
    targets = torch.zeros((len(pointers), batch["input_ids"].shape[1]), dtype=torch.bool)
    for q, (_, _, positions) in enumerate(pointers):
        targets[q, torch.from_numpy(positions)] = True
    batch["pointer_rows"] = torch.tensor([p[0] for p in pointers], dtype=torch.long)
    batch["pointer_queries"] = torch.tensor([p[1] for p in pointers], dtype=torch.long)
    batch["pointer_targets"] = targets
    batch["answer_rows"] = torch.tensor([a[0] for a in answers], dtype=torch.long)
    batch["answer_queries"] = torch.tensor([a[1] for a in answers], dtype=torch.long)
    return kind, batch


def answer_positions(labels: list[int]) -> list[list[int]]:
    """Per answer, in turn order, the positions whose next-token predictions are the answer's tokens
    (its closing ``<|im_end|>`` left out). Every one of them needs the image: answers share first
    tokens ("c" of circle and cross, "t" of triangle, two and three), so the choice is made again at
    later positions."""
    spans: list[list[int]] = []
    for p in range(1, len(labels)):
        if labels[p] == -100:
            continue
        if labels[p - 1] == -100:
            spans.append([])
        spans[-1].append(p - 1)
    return [span[:-1] for span in spans]


class GroundingHead(torch.nn.Module):
    """Throwaway linear readout of every image token's shape, colour and tile slot (not saved)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.sizes = (NUM_SHAPES + 1, CHECKER + 1, SLOTS)
        self.linear = torch.nn.Linear(hidden, sum(self.sizes))
        self.register_buffer("shape_weights", torch.tensor(GROUNDING_SHAPE_WEIGHTS))

    def forward(self, states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shape, colour, slot = self.linear(states).split(self.sizes, dim=-1)
        ce = functools.partial(torch.nn.functional.cross_entropy, ignore_index=UNLABELLED)
        return ce(shape, labels[0], weight=self.shape_weights) + ce(colour, labels[1]) + ce(slot, labels[2])


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


def reuse_stage0(model, cfg: TrainConfig) -> None:
    """Load the vision tower of an earlier run: what stage 0 would compute again (it is seeded and the
    tower is frozen after it), so only that run's seed and stage-0 steps must match."""
    from transformers import InternVLForConditionalGeneration

    source = Path(cfg.vision_from)
    done = json.loads((source / "mesh_checkpoint.json").read_text())["config"]
    if (done["seed"], done["vision_steps"]) != (cfg.seed, cfg.vision_steps):
        raise ValueError(f"{source} ran stage 0 with seed {done['seed']}, {done['vision_steps']} steps")
    earlier = InternVLForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
    model.model.vision_tower.load_state_dict(earlier.model.vision_tower.state_dict(), strict=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr``, then a cosine down to a tenth of it at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass
class _Run:
    """What the steps of one training run share: the model, what stage 1 trains, where it writes."""

    cfg: TrainConfig
    out: Path
    log: Callable[[str], None]
    model: Any
    tokenizer: Any
    codec: PromptCodec
    parameters: int  # of the saved model (the grounding head is not saved)
    head: GroundingHead
    opt: torch.optim.AdamW
    trained: list[torch.nn.Parameter]  # stage 1's parameters, in the optimizer's order (for the clip)
    log_path: Path
    log_file: IO[str]
    started: float  # time.monotonic() when training began


@dataclass
class _Losses:
    """One stage-1 step's objectives; an auxiliary one is None where its weight (or its batch) is 0."""

    total: torch.Tensor
    answers: torch.Tensor  # the language model's own loss on the answer tokens
    grounding: torch.Tensor | None
    pointer: torch.Tensor | None
    readout: torch.Tensor | None


def train(out_dir: str | Path, cfg: TrainConfig, log=print) -> Path:
    run = _set_up(Path(out_dir), cfg, log)
    _stage0(run)
    pool_started = time.monotonic()
    side = math.isqrt(run.model.config.image_seq_length)
    index = PoolIndex(build_pool(run.model.model.vision_tower, cfg.seed, cfg.pool_tiles, side, log=log))
    pool_seconds = round(time.monotonic() - pool_started)
    _stage1(run, _batches_in_background(cfg, run.codec, index), pool_seconds)
    run.log_file.close()
    return run.out


def _set_up(out: Path, cfg: TrainConfig, log: Callable[[str], None]) -> _Run:
    """The seeded model, stage 1's optimizer (over the grounding head too) and the open training log."""
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tokenizer = build_model(cfg.seed)
    codec = PromptCodec(tokenizer, model.config.image_seq_length)
    parameters = sum(p.numel() for p in model.parameters())
    head = GroundingHead(model.config.text_config.hidden_size)
    groups: dict[bool, list] = {}
    for n, p in [*model.named_parameters(), *head.named_parameters(prefix="grounding")]:
        if "vision_tower" not in n:  # stage 1 keeps the stage-0 tower as it is (frozen in _stage0)
            groups.setdefault(p.dim() >= 2 and "embed" not in n, []).append(p)
    opt = torch.optim.AdamW(
        [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0} for decay, ps in groups.items()],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    log_path = out.parent / f"{out.name}.train_log.jsonl"
    return _Run(
        cfg=cfg,
        out=out,
        log=log,
        model=model,
        tokenizer=tokenizer,
        codec=codec,
        parameters=parameters,
        head=head,
        opt=opt,
        trained=[p for ps in groups.values() for p in ps],
        log_path=log_path,
        log_file=log_path.open("w"),
        started=time.monotonic(),
    )


def _stage0(run: _Run) -> None:
    """The vision tower: trained alone (or taken from an earlier run), then frozen."""
    cfg, tower = run.cfg, run.model.model.vision_tower
    if cfg.vision_from:
        reuse_stage0(run.model, cfg)
    elif cfg.vision_steps:
        pretrain_vision(
            tower,
            cfg.vision_steps,
            cfg.seed,
            log=run.log,
            record=lambda r: run.log_file.write(json.dumps(r) + "\n"),
        )
    tower.requires_grad_(False)


def _batches_in_background(cfg: TrainConfig, codec: PromptCodec, index: PoolIndex) -> queue.Queue:
    """Stage 1's batches in step order, assembled on a thread while the model trains."""
    batches: queue.Queue = queue.Queue(maxsize=4)

    def produce():
        for step in range(cfg.steps):
            batches.put(batch_for(step, cfg, codec, index))

    threading.Thread(target=produce, daemon=True, name="demo-batches").start()
    return batches


def _stage1(run: _Run, batches: queue.Queue, pool_seconds: int) -> None:
    """The projector, the language model and the grounding head learn from the pooled tower output:
    one optimizer step per batch, a log record per step, an evaluation and a save now and then."""
    cfg, model = run.cfg, run.model
    if cfg.pointer_weight:
        model.set_attn_implementation("eager")  # attention probabilities come back, and carry gradients
    ema: dict[str, float] = {}
    model.train()
    provenance = {"origin": "train-demo", "config": asdict(cfg), "parameters": run.parameters}
    run.log(f"training {run.parameters / 1e6:.2f} M parameters for {cfg.steps} steps; log {run.log_path}")
    for step in range(cfg.steps):
        kind, batch = batches.get()
        for group in run.opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        losses = _losses(run, batch)
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_(run.trained, 1.0)
        run.opt.step()
        run.opt.zero_grad(set_to_none=True)
        record = _step_record(step, kind, losses, ema, run.started)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record["eval"] = quick_eval(model, run.codec, cfg.eval_per_group)
        run.log_file.write(json.dumps(record) + "\n")
        run.log_file.flush()
        if step % 25 == 0 or "eval" in record:
            smooth = " ".join(f"{k}={v:.3f}" for k, v in sorted(ema.items()))
            run.log(
                f"step {step} {record['elapsed_s']}s lr {lr_at(step, cfg):.2e} {smooth} {record.get('eval', '')}"
            )
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            provenance["steps_done"] = step + 1
            provenance["train_seconds"] = round(time.monotonic() - run.started)
            provenance["pool_seconds"] = pool_seconds
            save_checkpoint(model.eval(), run.tokenizer, run.out, provenance)
            model.train()


def _losses(run: _Run, batch: dict[str, torch.Tensor]) -> _Losses:
    """The forward pass on ``batch`` (its stored tower output in place of the tower) and every
    objective with a weight: the answers, the grounding head, the pointer head, the readout."""
    cfg, model = run.cfg, run.model
    grounding = batch.pop("grounding")
    rows, queries, targets = (batch.pop(k) for k in ("pointer_rows", "pointer_queries", "pointer_targets"))
    answer_rows, answer_at = batch.pop("answer_rows"), batch.pop("answer_queries")
    with stored_features(model):
        result = model(
            **batch,
            output_hidden_states=cfg.grounding_weight > 0 or cfg.readout_weight > 0,
            output_attentions=cfg.pointer_weight > 0,
        )
    loss = result.loss
    aux = pointer = readout = None
    if cfg.grounding_weight:
        states = result.hidden_states[GROUNDING_LAYER][batch["input_ids"] == model.config.image_token_id]
        aux = run.head(states, grounding)
        loss = loss + cfg.grounding_weight * aux
    if cfg.pointer_weight and len(rows):
        attention = result.attentions[POINTER_LAYER][rows, POINTER_HEAD, queries]  # (pointers, positions)
        pointer = -torch.log((attention * targets).sum(-1).clamp_min(1e-6)).mean()
        loss = loss + cfg.pointer_weight * pointer
    if cfg.readout_weight:
        early = result.hidden_states[READOUT_STATES][answer_rows, answer_at]
        logits = model.lm_head(model.model.language_model.norm(early))
        readout = torch.nn.functional.cross_entropy(logits, batch["labels"][answer_rows, answer_at + 1])
        loss = loss + cfg.readout_weight * readout
    return _Losses(total=loss, answers=result.loss, grounding=aux, pointer=pointer, readout=readout)


def _step_record(step: int, kind: str, losses: _Losses, ema: dict[str, float], started: float) -> dict:
    """The training log's record of one step; ``ema`` (the smoothed losses the console shows) updated."""
    value = losses.answers.item()
    ema[kind] = 0.95 * ema.get(kind, value) + 0.05 * value
    record = {
        "step": step,
        "kind": kind,
        "loss": round(value, 4),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    for name, loss in (
        ("pointer", losses.pointer),
        ("readout", losses.readout),
        ("grounding", losses.grounding),
    ):
        if loss is not None:
            record[f"{name}_loss"] = round(loss.item(), 4)
            ema[name] = 0.95 * ema.get(name, record[f"{name}_loss"]) + 0.05 * loss.item()
    return record
