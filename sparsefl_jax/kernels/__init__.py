"""Pallas kernels: block-sparse matmul and a ``LinearOp`` that routes layers through it.

On CPU the kernels run in Pallas interpret mode (correctness only; a dense masked
XLA matmul is far faster there). On TPU/GPU they compile to Mosaic/Triton.

The submodule ``block_sparse_matmul`` and its main function share a name, so the
function is imported explicitly::

  from sparsefl_jax.kernels.block_sparse_matmul import block_sparse_matmul
"""
from sparsefl_jax.kernels import block_sparse_matmul
from sparsefl_jax.kernels import ops
from sparsefl_jax.kernels.block_sparse_matmul import (KernelConfig,
                                                      block_sparse_matmul_reference,
                                                      nonzero_block_lists)
from sparsefl_jax.kernels.ops import BlockSparseOp

__all__ = [
    'BlockSparseOp', 'KernelConfig', 'block_sparse_matmul', 'block_sparse_matmul_reference',
    'nonzero_block_lists', 'ops',
]
