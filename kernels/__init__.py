"""Block-sparse attention kernels and backends. Imports torch (and Triton where present), never ComfyUI."""

from .attention import BACKENDS, choose_backend, describe_backend, sparse_attention
from .checks import AttentionInputError
from .schedule import BlockSchedule, SparsityPattern, build_block_schedule

__all__ = [
    "BACKENDS",
    "AttentionInputError",
    "BlockSchedule",
    "SparsityPattern",
    "build_block_schedule",
    "choose_backend",
    "describe_backend",
    "sparse_attention",
]
