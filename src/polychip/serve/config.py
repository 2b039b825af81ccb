"""EngineConfig: the serving engine's settings (shared by its scheduler, runner and `polychip serve`)."""
from __future__ import annotations

from dataclasses import dataclass

from polychip.config import ConfigError


def _pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return tuple(out)


@dataclass
class EngineConfig:
    #: Most sequences decoding at once (the largest decode bucket).
    max_batch: int = 16
    #: Tokens per KV block.
    page_size: int = 16
    #: Longest sequence (prompt + completion) served; None: the model's context. Sizes the KV pool and
    #: every page table, so a short limit makes decode cheaper.
    max_model_len: int | None = None
    #: KV blocks in the pool (block 0 is scratch); None: enough for max_batch sequences of max_model_len
    #: tokens, capped by kv_memory_fraction of the device's free memory where the device reports it.
    kv_blocks: int | None = None
    #: Most of the device's free memory (after weights) the KV cache may take when kv_blocks is None.
    kv_memory_fraction: float = 0.85
    #: Most tokens of one prompt processed per engine iteration (the widest prefill bucket).
    prefill_chunk: int = 64
    #: Most prompts prefilled together in one step (each its own next chunk, padded to one width):
    #: requests arriving together start together instead of one per iteration.
    prefill_rows: int = 4
    #: Most requests waiting for admission; beyond it submit() raises QueueFull.
    max_queue: int = 256
    #: Reuse KV blocks of identical prompt prefixes.
    prefix_cache: bool = True
    #: Compute and KV dtype.
    compute_dtype: str = "float32"

    def batch_buckets(self) -> tuple[int, ...]:
        """Decode batch sizes the runner compiles ([B, 1] each)."""
        return _pow2_buckets(1, self.max_batch)

    def chunk_buckets(self) -> tuple[int, ...]:
        """Prefill chunk lengths the runner compiles."""
        return _pow2_buckets(min(16, self.prefill_chunk), self.prefill_chunk)

    def prefill_row_buckets(self) -> tuple[int, ...]:
        """Prefill batch sizes the runner compiles ([R, C] for each R here and C in chunk_buckets)."""
        return _pow2_buckets(1, min(self.prefill_rows, self.max_batch))

    def validate(self) -> None:
        for name in ("max_batch", "page_size", "prefill_chunk", "prefill_rows", "max_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"serve: max_model_len must be >= 2, got {self.max_model_len}")
        if self.kv_blocks is not None and self.kv_blocks < 2:
            raise ConfigError(f"serve: kv_blocks must be >= 2 (one is scratch), got {self.kv_blocks}")
        if not 0 < self.kv_memory_fraction <= 1:
            raise ConfigError(f"serve: kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")
