"""Decoder configuration: one validated model per concern, composed in ``DecoderConfig``.

Built once at the entry point (CLI, Serve builder, test) and passed down; library code reads no
environment. KV sizing is here: the cache gets ``memory_fraction`` of the device's memory minus the
weights (or an explicit ``num_blocks``), and start-up fails with an error naming the knob to turn when
one sequence of ``max_model_len`` tokens cannot fit.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.common.config import CommonConfig, ModelConfig, StrictModel
from services.common.limits import MAX_GRAMMAR_COMPILE_MS, MAX_IMAGES_PER_REQUEST, MAX_SCHEMA_BYTES


class CacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    block_size: int = Field(
        16, ge=1, le=4096, description="Tokens per KV block; the backend may constrain it."
    )
    memory_fraction: float = Field(
        0.9, gt=0.0, le=1.0, description="Share of device memory (weights + KV cache) the decoder may use."
    )
    num_blocks: int | None = Field(
        None, ge=1, description="Exact number of KV blocks; overrides memory_fraction (tests, CPU)."
    )
    cpu_memory_bytes: int | None = Field(
        4 << 30,
        ge=1,
        description=(
            "Memory (weights + KV cache) to budget on CPU; None: the machine's physical memory. A bound by "
            "default: several decoders (and other services) share a machine's RAM."
        ),
    )
    enable_prefix_caching: bool = True


class SchedulerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_num_seqs: int = Field(64, ge=1, le=4096, description="Requests running in one step at most.")
    max_num_batched_tokens: int = Field(2048, ge=1, le=1 << 20, description="Token budget of one step.")
    max_model_len: int | None = Field(
        None,
        ge=2,
        description=(
            "Prompt + output tokens per request. Default and upper bound: the checkpoint's positions, or "
            "fewer where its rope changes with the length (dynamic NTK: max_position_embeddings; longrope: "
            "original_max_position_embeddings), up to which it is served exactly."
        ),
    )
    enable_chunked_prefill: bool = True
    overlap: bool | Literal["auto"] = Field(
        "auto",
        description=(
            "Schedule and prepare step N+1 while step N runs (its sampled ids feed N+1 on the device). "
            "auto: on CUDA. Steps with penalised requests, and tensor parallelism, run in series."
        ),
    )
    fair_share: bool = Field(
        True,
        description=(
            "Weighted fair share between tenants (their weights come with the signed request context) "
            "within strict priority classes, and tenants' max_kv_share caps; off: priority, then arrival."
        ),
    )
    max_wait_s: float = Field(
        30.0,
        gt=0.0,
        le=86400.0,
        description=(
            "With fair_share: a request that has waited this long is served above every priority "
            "until it finishes, so a lower class waits a bounded time."
        ),
    )
    max_images_per_request: int = Field(
        MAX_IMAGES_PER_REQUEST,
        ge=0,
        le=MAX_IMAGES_PER_REQUEST,
        description="Images in one request at most (16, the mesh's bound; a lower value only tightens it).",
    )


class StructuredConfig(BaseModel):
    """Structured outputs (``response_format``): grammars compiled off the engine thread and cached."""

    model_config = ConfigDict(extra="forbid")

    grammar_cache_size: int = Field(
        256,
        ge=1,
        le=100_000,
        description="Compiled grammars kept (an LRU keyed by the schema's canonical JSON).",
    )
    compile_threads: int = Field(
        1, ge=1, le=64, description="Threads that compile grammars at admission (never the engine thread)."
    )
    mask_threads: int = Field(
        1, ge=1, le=64, description="Threads that fill the token masks of a step's constrained rows."
    )
    max_compile_ms: int = Field(
        MAX_GRAMMAR_COMPILE_MS,
        ge=1,
        le=MAX_GRAMMAR_COMPILE_MS,
        description="Longest a request waits for its grammar (a request's own budget, the tenant's, is lower).",
    )
    max_schema_bytes: int = Field(
        MAX_SCHEMA_BYTES,
        ge=1,
        le=MAX_SCHEMA_BYTES,
        description="Largest JSON schema accepted, as compact JSON (256 KiB, the mesh's bound).",
    )


class ParallelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int = Field(1, ge=1, le=64)
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on CUDA, gloo on CPU.")
    master_addr: str = "127.0.0.1"
    master_port: int | None = Field(None, ge=1, le=65535, description="Default: a free port.")
    start_timeout_s: float = Field(300.0, gt=0)


class CompileConfig(BaseModel):
    """How decode steps are executed. Off by default: a GPU default is switched on only after the GPU
    kit's fidelity stage has passed with it on, on a real card (README, GPU verification)."""

    model_config = ConfigDict(extra="forbid")

    cuda_graphs: bool = Field(
        False,
        description=(
            "Decode-only steps padded to batch buckets (1, 2, 4, 8, then every 16 up to "
            "scheduler.max_num_seqs) on static buffers, one CUDA graph per bucket captured at start-up; "
            "on the CPU the same static path runs eagerly. Prefill and mixed steps stay eager. "
            "Tensor parallelism 1 only."
        ),
    )


class DecoderSettings(BaseModel):
    """What a mesh config may set for one model's decoder (``models[].decoder_settings``).

    The checkpoint, device and dtype come from the model, the tensor-parallel size from
    ``models[].tensor_parallel_size``. Validated when the mesh config is built, so a typo fails at
    ``config render`` with its field path, not when a replica starts.
    """

    model_config = ConfigDict(extra="forbid")

    attention_backend: Literal["auto", "torch_paged", "flash_attn", "triton_paged"] = Field(
        "auto",
        description=(
            "auto: flash_attn on CUDA when installed and the block size suits it, else torch_paged. "
            "triton_paged (decode reads the paged cache in place with a Triton kernel) only when named."
        ),
    )
    cache: CacheConfig = Field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    structured: StructuredConfig = Field(default_factory=StructuredConfig)
    compile: CompileConfig = Field(default_factory=CompileConfig)
    seed: int = Field(0, ge=0, description="Seeds sampling of requests that bring no seed of their own.")
    engine_process: bool = Field(
        True,
        description=(
            "Run the engine (scheduler, model, tensor-parallel ranks) in a process of its own, so its steps "
            "never share the GIL with request handling (gRPC, asyncio, detokenisation). false: a thread of "
            "the caller's process, for tests and benchmarks that look inside the engine."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> DecoderSettings:
        if self.scheduler.max_model_len is not None and not self.scheduler.enable_chunked_prefill:
            if self.scheduler.max_num_batched_tokens < self.scheduler.max_model_len:
                raise ValueError(
                    "without chunked prefill, scheduler.max_num_batched_tokens must be >= max_model_len"
                )
        if self.compile.cuda_graphs and self.parallel.tensor_parallel_size > 1:
            raise ValueError("compile.cuda_graphs needs tensor_parallel_size 1: turn one of them off")
        return self


class DecoderConfig(DecoderSettings):
    """Everything the decoder needs: its settings plus the checkpoint, dtype and device."""

    model: str = Field(..., description="Checkpoint directory (transformers-native InternVL layout).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU."
    )
    device: Literal["cpu", "cuda"] = "cpu"

    def torch_dtype_name(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.device == "cuda" else "float32"


class DecoderAppArgs(StrictModel):
    """The args of a decoder's Serve application (``services.decoder.deployment:build_app``)."""

    model: ModelConfig
    settings: DecoderSettings = Field(default_factory=DecoderSettings)
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    common: CommonConfig = Field(default_factory=CommonConfig)
    deployment_options: dict[str, Any] = Field(
        default_factory=dict, description="Serve deployment options (resources, scaling, placement group)."
    )

    def decoder_config(self, device: Literal["cpu", "cuda"]) -> DecoderConfig:
        """The config a replica on ``device`` builds from these args (the support check builds the same)."""
        settings = self.settings.model_dump(exclude_unset=True)
        parallel = {"tensor_parallel_size": self.tensor_parallel_size, **settings.pop("parallel", {})}
        return DecoderConfig.model_validate(
            {
                "model": self.model.path,
                "dtype": self.model.dtype,
                "device": device,
                "parallel": parallel,
                **settings,
            }
        )
