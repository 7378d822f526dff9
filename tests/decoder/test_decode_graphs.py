"""The static-shape decode path of ``compile.cuda_graphs``, run eagerly on the CPU.

The path CUDA captures and replays is the one run here: decode-only steps padded to batch buckets, on
static buffers, padding rows on the scratch block, overlapped scheduling's placeholders filled into the
static ``input_ids`` on the device. It must give the dynamic path's tokens exactly (greedy and seeded
sampling, requests joining and finishing, so the batch crosses buckets), and within a bucket every step
must see the same tensors (shapes and storage) the graph was captured on.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from services.decoder.config import DecoderConfig
from services.decoder.engine.decode_graphs import buckets_for
from services.decoder.engine.llm_engine import LLMEngine
from services.decoder.engine.sampling_params import SamplingParams
from tests.decoder.helpers import CASES, make_config, make_input, run, tokens_of


def test_buckets():
    assert buckets_for(1) == [1]
    assert buckets_for(6) == [1, 2, 4, 6]
    assert buckets_for(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert buckets_for(40) == [1, 2, 4, 8, 16, 32, 40]


def test_graphs_need_one_rank(tiny_ckpt):
    with pytest.raises(ValueError, match="compile.cuda_graphs needs tensor_parallel_size 1"):
        DecoderConfig(
            model=str(tiny_ckpt), compile={"cuda_graphs": True}, parallel={"tensor_parallel_size": 2}
        )


class Recorder:
    """Stands in for the model inside ``DecodeGraphs``: records what each static step passed it."""

    def __init__(self, model):
        self.model = model
        self.calls: dict[int, set] = defaultdict(set)  # bucket -> {(storage and shape of each input)}

    def __call__(self, input_ids, positions, kv_caches, meta):
        st = meta.static
        seen = tuple(
            (t.data_ptr(), tuple(t.shape))
            for t in (input_ids, positions, meta.slot_mapping, st.block_table, st.context_lens)
        )
        self.calls[input_ids.shape[0]].add(seen)
        return self.model(input_ids, positions, kv_caches, meta)


def _inputs(reference, text_only: bool):
    """Greedy and seeded requests over every case; ``text_only``: the text cases (short contexts, for
    Triton's interpreter, which runs each kernel program in Python)."""
    cases = [c for c in CASES if not c.image_seeds] if text_only else CASES
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=7)
    inputs = [make_input(f"g{k}", case, reference) for k, case in enumerate(cases)]
    inputs += [make_input(f"s{k}", case, reference, seeded) for k, case in enumerate(cases[:4])]
    return inputs, [k % 5 for k in range(len(inputs))]  # requests join while others decode


@pytest.mark.parametrize(
    ("backend", "overlap"), [("torch_paged", True), ("torch_paged", False), ("triton_paged", True)]
)
def test_static_decode_gives_the_dynamic_tokens(tiny_ckpt, reference, overlap, backend):
    inputs, arrivals = _inputs(reference, text_only=backend == "triton_paged")
    engines = {
        graphs: LLMEngine(
            make_config(
                tiny_ckpt,
                attention_backend=backend,
                scheduler={"overlap": overlap},
                compile={"cuda_graphs": graphs},
            )
        )  # fmt: skip
        for graphs in (False, True)
    }
    try:
        runner = engines[True].executor.runner
        recorder = Recorder(runner.graphs.model)
        runner.graphs.model = recorder
        assert runner.kv_caches[0].shape[1] == runner.num_blocks + 1  # the scratch block
        dynamic = {k: tokens_of(e) for k, e in run(engines[False], inputs, arrivals).items()}
        static = {k: tokens_of(e) for k, e in run(engines[True], inputs, arrivals).items()}
        assert engines[False].executor.runner.graphs is None
    finally:
        for eng in engines.values():
            eng.shutdown()
    assert static == dynamic
    assert runner.graphs.replays > 10
    assert len(recorder.calls) >= 3, f"the batch should cross buckets: {sorted(recorder.calls)}"
    for bucket, seen in recorder.calls.items():
        assert len(seen) == 1, f"bucket {bucket}: the static inputs moved or changed shape: {seen}"
        (ids, _pos, slots, table, lens) = next(iter(seen))
        assert ids[1] == slots[1] == lens[1] == (bucket,)
        assert table[1] == (bucket, runner.graphs.max_width)
