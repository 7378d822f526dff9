"""What the tensor-parallel driver sends per step: chunk work and block-table edits, never whole tables.

The ranks' mirror must rebuild exactly the driver's ``StepInput`` through growth, preemption (a
rebuilt table) and release; end to end, TP=2 against TP=1 is covered in ``test_fidelity``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from services.decoder.engine.model_runner import ModelRunner
from services.decoder.engine.request import Request
from services.decoder.engine.sampling_params import SamplingParams
from services.decoder.engine.scheduler import ScheduledChunk
from services.decoder.engine.tp_worker import DeltaEncoder, TableMirror

BS = 4


def request(rid: str, prompt_len: int) -> Request:
    return Request(rid, list(range(10, 10 + prompt_len)), SamplingParams(temperature=0.0), 8)


def same_step(a, b) -> None:
    for name in ("input_ids", "positions", "slot_mapping", "logits_indices"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.query_start_loc == b.query_start_loc
    assert a.context_lens == b.context_lens
    assert a.block_tables == b.block_tables


def test_mirror_rebuilds_the_drivers_step_from_edits():
    runner = SimpleNamespace(
        block_size=BS, dtype=torch.float32, device=torch.device("cpu"), graphs=None
    )  # what build_step reads (tensor parallelism runs without decode graphs)
    encoder, mirror = DeltaEncoder(), TableMirror()
    r1, r2 = request("r1", 6), request("r2", 3)

    def step(chunks):
        delta = encoder.encode(chunks)
        want = ModelRunner.prepare(SimpleNamespace(**vars(runner), build_step=build), chunks)
        got = build(*mirror.apply(delta))
        same_step(want, got)
        return delta

    def build(items, tables):
        return ModelRunner.build_step(runner, items, tables)

    # prefill: whole tables go once
    r1.block_ids, r2.block_ids = [3, 4], [7]
    d = step([ScheduledChunk(r1, 0, 6, True), ScheduledChunk(r2, 0, 3, True)])
    assert [(c.keep_blocks, c.new_blocks) for c in d.chunks] == [(0, [3, 4]), (0, [7])]
    assert d.chunks[0].work.token_ids == list(range(10, 16))

    # decode: one token each; r2 crosses into a new block, r1 sends nothing of its table
    r1.append_output_token(99)
    r2.append_output_token(98)
    r2.block_ids.append(8)
    d = step([ScheduledChunk(r1, 6, 1, True), ScheduledChunk(r2, 3, 1, True)])
    assert [(c.keep_blocks, c.new_blocks) for c in d.chunks] == [(2, []), (1, [8])]
    assert [c.work.token_ids for c in d.chunks] == [[99], [98]]

    # r2 preempted and recomputed into other blocks; r1 ends
    encoder.release("r1")
    r2.block_ids = [7, 2]
    d = step([ScheduledChunk(r2, 0, 5, True)])
    assert d.released == ["r1"]
    assert (d.chunks[0].keep_blocks, d.chunks[0].new_blocks) == (1, [2])
    assert set(mirror.tables) == {"r2"} and mirror.tables["r2"] == [7, 2]

    # nothing released twice, unknown ids not sent
    encoder.release("never-seen")
    d = step([])
    assert d.released == [] and d.chunks == []
