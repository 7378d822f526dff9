"""Preprocess benchmark: our pipeline against the reference InternVL ``load_image``, in one process.

    python benchmarks/preprocess_bench.py [--out benchmarks/results/preprocess.json] [--iterations N]

Images (synthetic, seeded): a 1920x1080 photo-like JPEG, a 4000x3000 JPEG and an 800x600 PNG, tiled
with max_num 12.

- "ours": ``decode_image`` + ``tile_image`` + SHA-256 of the bytes -> uint8 (N, 448, 448, 3), which is
  what the preprocess service ships (normalisation happens on the encoder's device).
- "reference": PIL decode + ``dynamic_preprocess`` + per-tile ToTensor + Normalize (numpy, float32,
  as torchvision computes it) stacked to float32 (N, 3, 448, 448), as ``load_image`` does.
- "ours pipeline 2 workers": one request of one image through ``Preprocessor`` with 2 threads, whose
  grid and thumbnail resizes run side by side: the latency an idle service gives.
- "ours + cpu normalize": ours followed by ``normalize_tiles`` on the CPU (only if torch is installed),
  to show the cost when normalisation is not moved to the encoder's device.

Reports (a) single-thread latency (median over iterations, all variants interleaved) of each and the
ratio, in wall and in thread-CPU time, (b) images/s with 2 workers for each and the ratio, with
threads and with processes (median of rounds, order rotated), and (c) the "bit-exact floor": the
decode and the two Pillow resizes that any pipeline with the reference's pixels must do, which caps
the possible speedup. Writes JSON with machine info and load averages (the figures are only as quiet
as the machine). If a target (>= 1.5x) is missed, a cProfile of ours is written into the JSON too.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime as dt
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from services.common.types import TilingParams, sha256_hex  # noqa: E402
from services.demo.reference import reference_load_image, reference_tiles  # noqa: E402
from services.preprocess.config import DecodeLimits, PreprocessConfig  # noqa: E402
from services.preprocess.decoding import decode_image  # noqa: E402
from services.preprocess.pipeline import Preprocessor  # noqa: E402
from services.preprocess.tiling import plan_tiles, tile_image  # noqa: E402
from tests.support.images import encode, photo_like  # noqa: E402 - the images the tests use

MAX_NUM = 12
PARAMS = TilingParams(max_num=MAX_NUM)
LIMITS = DecodeLimits()
WORKERS = 2
TARGET = 1.5


def make_images() -> dict[str, bytes]:
    return {
        "1920x1080.jpg": encode(photo_like(1920, 1080, seed=1), "JPEG", quality=90),
        "4000x3000.jpg": encode(photo_like(4000, 3000, seed=2), "JPEG", quality=90),
        "800x600.png": encode(photo_like(800, 600, seed=3), "PNG", compress_level=6),
    }


def ours(data: bytes) -> np.ndarray:
    return tile_image(decode_image(data, LIMITS), PARAMS, sha256=sha256_hex(data)).tiles


def reference(data: bytes) -> np.ndarray:
    return reference_load_image(data, max_num=MAX_NUM)


def ours_cpu_normalize(data: bytes):
    import torch

    from services.preprocess.normalize import normalize_tiles

    return normalize_tiles(torch.from_numpy(ours(data)))


def _latency(fns: dict[str, Callable[[bytes], object]], data: bytes, iterations: int) -> dict[str, float]:
    """Median wall and CPU milliseconds of each function, calls interleaved so load hits all alike.

    CPU time (``time.thread_time``) is what the call itself consumed; unlike wall time it is not
    inflated when other processes take the cores, so it is the steadier figure on a shared machine.
    """
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn(data)  # warm-up
    for _ in range(iterations):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.thread_time()
            fn(data)
            cpu[name].append(time.thread_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    out = {}
    for name in fns:
        out[f"{name}_ms"] = statistics.median(wall[name]) * 1e3
        out[f"{name}_cpu_ms"] = statistics.median(cpu[name]) * 1e3
    return out


def _throughput(pool: Executor, fn: Callable[[bytes], object], stream: list[bytes]) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process; the latter is only
    meaningful for thread pools)."""
    list(pool.map(fn, stream[:WORKERS]))  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    for _ in pool.map(fn, stream):
        pass
    return len(stream) / (time.perf_counter() - start), len(stream) / (time.process_time() - cpu)


def _pipeline_throughput(stream: list[bytes]) -> tuple[float, float]:
    """The service path: concurrent requests of 3 images through ``Preprocessor.atile_images``."""

    async def run(pre: Preprocessor) -> None:
        requests = [stream[k : k + 3] for k in range(0, len(stream), 3)]
        await asyncio.gather(*(pre.atile_images([(d, PARAMS) for d in req]) for req in requests))

    with Preprocessor(PreprocessConfig(workers=WORKERS)) as pre:
        pre.tile_images([(stream[0], PARAMS)])  # warm-up
        start, cpu = time.perf_counter(), time.process_time()
        asyncio.run(run(pre))
        return len(stream) / (time.perf_counter() - start), len(stream) / (time.process_time() - cpu)


def _floor_steps(data: bytes) -> dict[str, Callable[[bytes], object]]:
    """The work any bit-exact pipeline must do: the reference's decode and its two BICUBIC resizes.

    Their sum bounds a bit-exact pipeline's single-thread latency from below, and so bounds the
    speedup over the reference from above.
    """
    rgb = decode_image(data, LIMITS)
    plan = plan_tiles(rgb.width, rgb.height, PARAMS)
    cols, rows = plan.grid
    size = plan.tile_size
    return {
        "floor_decode": lambda d: decode_image(d, LIMITS),
        "floor_grid_resize": lambda _d: rgb.resize((cols * size, rows * size), Image.Resampling.BICUBIC),
        "floor_thumbnail_resize": lambda _d: rgb.resize((size, size), Image.Resampling.BICUBIC),
    }


def _profile(images: dict[str, bytes]) -> dict[str, list[str]]:
    out = {}
    for name, data in images.items():
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(3):
            ours(data)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(8)
        lines = [ln.rstrip() for ln in buf.getvalue().splitlines() if ln.strip()]
        out[name] = lines[-10:]
    return out


def _machine() -> dict[str, object]:
    info: dict[str, object] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "numpy": np.__version__,
    }
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/preprocess.json")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--stream", type=int, default=4, help="images of each kind in a throughput run")
    parser.add_argument("--rounds", type=int, default=5, help="throughput runs per mode (median is kept)")
    args = parser.parse_args()

    machine = _machine()
    images = make_images()
    for data in images.values():  # the two outputs hold the same pixels
        tiles = ours(data)
        np.testing.assert_array_equal(tiles, reference_tiles(data, max_num=MAX_NUM))

    fns: dict[str, Callable[[bytes], object]] = {"ours": ours, "reference": reference}
    try:
        import torch

        torch.set_num_threads(1)
        fns["ours_cpu_normalize"] = ours_cpu_normalize
    except ImportError:
        pass
    latency = {}
    with Preprocessor(PreprocessConfig(workers=WORKERS)) as pre:
        fns["ours_pipeline_2_workers"] = lambda data: pre.tile_images([(data, PARAMS)])
        for name, data in images.items():
            row: dict[str, float] = {"bytes": len(data), "tiles": int(ours(data).shape[0])}
            row.update(_latency({**fns, **_floor_steps(data)}, data, args.iterations))
            row["floor_ms"] = sum(
                row[f"{k}_ms"] for k in ("floor_decode", "floor_grid_resize", "floor_thumbnail_resize")
            )
            row["ceiling_speedup"] = row["reference_ms"] / row["floor_ms"]
            row["speedup"] = row["reference_ms"] / row["ours_ms"]
            row["speedup_cpu"] = row["reference_cpu_ms"] / row["ours_cpu_ms"]
            row["speedup_pipeline_2_workers"] = row["reference_ms"] / row["ours_pipeline_2_workers_ms"]
            latency[name] = row
    total_ours = sum(r["ours_ms"] for r in latency.values())
    total_ref = sum(r["reference_ms"] for r in latency.values())

    stream = [data for _ in range(args.stream) for data in images.values()]
    # Median of ``rounds`` runs per mode, the modes' order rotated each round, to see past other load.
    runs: dict[str, list[float]] = {}
    cpu_runs: dict[str, list[float]] = {}

    def record(name: str, measured: tuple[float, float], cpu_meaningful: bool = True) -> None:
        runs.setdefault(name, []).append(measured[0])
        if cpu_meaningful:
            cpu_runs.setdefault(name, []).append(measured[1])

    modes: list[tuple[str, str, Callable[[bytes], object] | None]] = [
        ("ours_threads", "threads", ours),
        ("reference_threads", "threads", reference),
        ("ours_pipeline_threads", "pipeline", None),
        ("ours_processes", "processes", ours),
        ("reference_processes", "processes", reference),
    ]
    for round_ in range(args.rounds):
        shift = round_ % len(modes)  # rotate so no mode always runs at the same moment
        for name, kind, fn in modes[shift:] + modes[:shift]:
            if kind == "pipeline":
                record(name, _pipeline_throughput(stream))
            elif kind == "threads":
                with ThreadPoolExecutor(WORKERS) as pool:
                    record(name, _throughput(pool, fn, stream))
            else:
                with ProcessPoolExecutor(WORKERS) as pool:
                    record(name, _throughput(pool, fn, stream), cpu_meaningful=False)
    throughput = {name: statistics.median(values) for name, values in runs.items()}
    throughput_cpu = {name: statistics.median(values) for name, values in cpu_runs.items()}
    best_ref = max(throughput["reference_threads"], throughput["reference_processes"])

    results: dict[str, object] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine,
        "loadavg_at_end": os.getloadavg(),
        "config": {
            "max_num": MAX_NUM,
            "workers": WORKERS,
            "iterations": args.iterations,
            "stream": len(stream),
            "rounds": args.rounds,
        },
        "single_thread_latency_ms": latency,
        "single_thread_speedup_total": total_ref / total_ours,
        "single_thread_speedup_total_cpu": sum(r["reference_cpu_ms"] for r in latency.values())
        / sum(r["ours_cpu_ms"] for r in latency.values()),
        "throughput_images_per_s": throughput,
        "throughput_runs_images_per_s": runs,
        "throughput_images_per_cpu_s": throughput_cpu,
        "throughput_speedup_threads_cpu": throughput_cpu["ours_pipeline_threads"]
        / throughput_cpu["reference_threads"],
        "throughput_speedup_threads": throughput["ours_pipeline_threads"] / throughput["reference_threads"],
        "throughput_speedup_vs_best_reference": throughput["ours_pipeline_threads"] / best_ref,
        "target": TARGET,
    }
    missed = [
        k
        for k in ("single_thread_speedup_total", "throughput_speedup_threads")
        if results[k] < TARGET  # type: ignore[operator]
    ] + [f"latency {n}" for n, r in latency.items() if r["speedup"] < TARGET]
    results["targets_missed"] = missed
    total_floor = sum(r["floor_ms"] for r in latency.values())
    worst = min(latency, key=lambda n: latency[n]["ceiling_speedup"])
    results["bit_exact_floor_ms_total"] = total_floor
    results["bit_exact_ceiling_speedup_total"] = total_ref / total_floor
    results["where_the_time_goes"] = (
        "Bit-exact tiles need the reference's own Pillow decode and its two BICUBIC resizes (whole image "
        "to the grid, whole image to the thumbnail): the floor_* rows, measured interleaved with the "
        f"pipelines. They are {total_floor:.0f} of our {total_ours:.0f} ms over the three images. What we "
        "save is the reference's per-tile crops and float normalisation, so no bit-exact pipeline can "
        f"beat the reference by more than {total_ref / total_floor:.2f}x single-threaded on these images "
        f"({latency[worst]['ceiling_speedup']:.2f}x on {worst}, where decoding and resizing dominate). "
        "Throughput with 2 workers follows the same CPU-cost ratio."
    )
    if missed:
        results["profile_ours_tottime"] = _profile(images)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    print(
        f"{'image':<16}{'tiles':>6}{'ours ms':>10}{'ref ms':>10}{'speedup':>9}{'cpu speedup':>13}{'ours+norm ms':>14}{'pipe 2w ms':>12}"
    )
    for name, r in latency.items():
        norm = f"{r['ours_cpu_normalize_ms']:.1f}" if "ours_cpu_normalize_ms" in r else "-"
        print(
            f"{name:<16}{r['tiles']:>6}{r['ours_ms']:>10.1f}{r['reference_ms']:>10.1f}"
            f"{r['speedup']:>8.2f}x{r['speedup_cpu']:>12.2f}x{norm:>14}{r['ours_pipeline_2_workers_ms']:>12.1f}"
        )
    print(
        f"{'total':<16}{'':>6}{total_ours:>10.1f}{total_ref:>10.1f}{total_ref / total_ours:>8.2f}x"
        f"{results['single_thread_speedup_total_cpu']:>12.2f}x"
    )
    print(f"\nthroughput with {WORKERS} workers (images/s):")
    for k, v in throughput.items():
        print(f"  {k:<24}{v:>8.2f}")
    print(f"  speedup (pipeline vs reference, threads): {results['throughput_speedup_threads']:.2f}x")
    print(f"  same, per CPU second:                     {results['throughput_speedup_threads_cpu']:.2f}x")
    print(
        f"  speedup (pipeline vs best reference):     {results['throughput_speedup_vs_best_reference']:.2f}x"
    )
    if missed:
        print(f"\ntargets missed: {missed}; profile in {args.out}")
    print("\nbit-exact floor (decode + grid resize + thumbnail resize), single thread:")
    for name, r in latency.items():
        print(
            f"  {name:<16}decode {r['floor_decode_ms']:6.1f}  grid {r['floor_grid_resize_ms']:6.1f}  "
            f"thumb {r['floor_thumbnail_resize_ms']:6.1f}  = {r['floor_ms']:6.1f} ms"
            f"  -> best possible speedup {r['ceiling_speedup']:.2f}x"
        )
    print(f"  total ceiling: {results['bit_exact_ceiling_speedup_total']:.2f}x")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
