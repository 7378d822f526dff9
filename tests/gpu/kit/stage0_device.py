"""Stage 0: versions, and the device's measured bounds that later figures are divided by.

- device-to-device copy bandwidth (GB/s, 1e9 bytes; a copy reads and writes, so bytes moved = 2 x size);
- dense bf16 GEMM throughput (TFLOP/s, 2·m·n·k per matmul);
- which SDPA backends accept the engine's decode shapes (bf16, one query token per sequence).
"""

from __future__ import annotations

import platform

import torch

from .common import timed
from .report import INCONCLUSIVE, Context, StageResult, Verdict, judge

# Lower bounds that a healthy H100/H200 clears with room: HBM3 measures ~2.5-4.5 TB/s on a copy, dense
# bf16 ~600-900 TFLOP/s. Below them the card, its clocks or its driver are off.
MIN_COPY_GB_S = 1500.0
MIN_BF16_TFLOPS = 300.0


def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("transformers", "tokenizers", "safetensors", "huggingface-hub", "pydantic", "triton"):
        try:
            found[dist] = md.version(dist)
        except md.PackageNotFoundError:
            found[dist] = "absent"
    if torch.cuda.is_available():
        found["cuda"] = str(torch.version.cuda)
        found["gpu"] = torch.cuda.get_device_name()
        found["gpu_memory_GiB"] = f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f}"
    return found


def copy_bandwidth(device: str, smoke: bool) -> float:
    """GB/s of ``dst.copy_(src)`` over a buffer far larger than the L2 cache (1 GiB; 64 MiB in smoke)."""
    n = (64 if smoke else 1024) << 20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    wall, gpu = timed(device, lambda: dst.copy_(src), repeats=3 if smoke else 20)
    return 2 * n / (gpu if gpu is not None else wall) / 1e9


def gemm_tflops(device: str, smoke: bool) -> float:
    n = 512 if smoke else 8192
    dtype = torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    wall, gpu = timed(device, lambda: a @ b, repeats=2 if smoke else 30)
    return 2 * n**3 / (gpu if gpu is not None else wall) / 1e12


def sdpa_backends(device: str, smoke: bool) -> dict[str, dict[str, str]]:
    """Per backend and decode shape: "ok" or the reason it refused. The shapes are the two the engine's
    ``torch_paged`` decode issues (Qwen2.5-1.5B heads: 12 query, 2 KV, head_dim 128)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, hkv, d, ctx = (2, 4, 2, 16, 64) if smoke else (32, 12, 2, 128, 1024)
    dt = torch.bfloat16
    kv = torch.randn(b, hkv, ctx, d, device=device, dtype=dt)
    shapes = {
        "grouped (B,Hkv,G,D) x (B,Hkv,L,D)": (torch.randn(b, hkv, h // hkv, d, device=device, dtype=dt), {}),
        "gqa (B,H,1,D) + bool mask": (
            torch.randn(b, h, 1, d, device=device, dtype=dt),
            {"enable_gqa": True, "attn_mask": torch.ones(b, 1, 1, ctx, dtype=torch.bool, device=device)},
        ),
    }
    found: dict[str, dict[str, str]] = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):  # fmt: skip
        row = found.setdefault(backend.name, {})
        for label, (q, kwargs) in shapes.items():
            try:
                with sdpa_kernel([backend]):
                    torch.nn.functional.scaled_dot_product_attention(q, kv, kv, **kwargs)
                row[label] = "ok"
            except Exception as exc:  # noqa: BLE001 - any refusal is the answer: record why
                row[label] = str(exc).splitlines()[0][:200]
    return found


def run(ctx: Context, res: StageResult) -> None:
    res.figures["versions"] = versions()
    bw = copy_bandwidth(ctx.device, ctx.smoke)
    tf = gemm_tflops(ctx.device, ctx.smoke)
    ctx.bounds.update(copy_GB_s=bw, bf16_TFLOP_s=tf)
    res.figures.update(copy_GB_s=round(bw, 1), bf16_gemm_TFLOP_s=round(tf, 2))
    res.figures["sdpa_decode_backends"] = sdpa = sdpa_backends(ctx.device, ctx.smoke)
    if ctx.device != "cuda" or ctx.smoke:
        bound = "no bound off an H100/H200 at full size"
        res.add(Verdict("copy_bandwidth", INCONCLUSIVE, f"{bw:.1f} GB/s", bound))
        res.add(Verdict("bf16_gemm", INCONCLUSIVE, f"{tf:.2f} TFLOP/s", bound))
    else:
        res.add(
            judge("copy_bandwidth", bw >= MIN_COPY_GB_S, f"{bw:.1f} GB/s", f">= {MIN_COPY_GB_S:.0f} GB/s")
        )
        res.add(
            judge(
                "bf16_gemm", tf >= MIN_BF16_TFLOPS, f"{tf:.2f} TFLOP/s", f">= {MIN_BF16_TFLOPS:.0f} TFLOP/s"
            )
        )
    accepted = sorted({name for name, row in sdpa.items() for v in row.values() if v == "ok"})
    res.add(judge("sdpa_decode", bool(accepted), ", ".join(accepted) or "none", "at least one backend"))
