"""Compile the block-sparse attention kernel for given GPUs (no GPU needed) and print each build's shared memory.

Run by ``test_kernel_limits.py`` in a process of its own (without TRITON_INTERPRET):
``python compile_shared.py '[[[9, 0], 128, [128, 128, 8, 2, true]], ...]'`` prints a JSON list of bytes.
"""

from __future__ import annotations

import inspect
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ultragen.kernels import triton_block_sparse as tbs


def shared_bytes(capability: list[int], head_dim: int, cfg: list) -> int:
    block_m, block_n, num_warps, num_stages, kv_tma = cfg
    const = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=False, K_TMA=kv_tma, V_TMA=kv_tma,
                 HAS_PARTIAL=True)  # fmt: skip
    names = list(inspect.signature(tbs._block_sparse_fwd.fn).parameters)
    signature = {}
    for n in names:
        if n in const:
            signature[n] = "constexpr"
        elif n in ("K", "V") and kv_tma:
            signature[n] = f"tensordesc<bf16[1,1,{block_n},{head_dim}]>"
        elif n in ("Q", "K", "V", "Out"):
            signature[n] = "*bf16"
        elif n == "masks":
            signature[n] = "*i8"
        elif n.startswith(("part_", "full_")):
            signature[n] = "*i32"
        else:
            signature[n] = "fp32" if n == "qk_scale" else "i64" if n.startswith("stride") else "i32"
    source = ASTSource(fn=tbs._block_sparse_fwd, signature=signature,
                       constexprs={(names.index(k),): v for k, v in const.items()})  # fmt: skip
    kernel = triton.compile(source, target=GPUTarget("cuda", capability[0] * 10 + capability[1], 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))  # fmt: skip
    return kernel.metadata.shared


if __name__ == "__main__":
    print(json.dumps([shared_bytes(*build) for build in json.loads(sys.argv[1])]))
