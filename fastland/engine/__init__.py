"""The batched evaluator: many grid points per pass over the data, for any ``nn.Module``.

- ``core``: ``vmap(functional_call)`` and the loop over points, loss accumulation (any model, any loss);
- ``fastpaths``: exact rewrites, each recognizing its own pattern (factorized first layer, BN
  folding, fast pooling, in-place ReLU, im2col);
- ``strategy``: choosing loop/vmap/im2col, block sizes, out-of-memory back-off;
- ``precision``: fp32, tf32 (CUDA) or bf16;
- ``cost``: the cost model (MACs, activation sizes) measured on the model;
- ``evaluator``: ``BatchedEvaluator``, which puts them together.
"""

from .evaluator import BatchedEvaluator
from .precision import DTYPES, PRECISIONS, precision_context, resolve_precision
from .strategy import CHOICES, STRATEGIES, run_with_backoff

__all__ = ["CHOICES", "DTYPES", "PRECISIONS", "STRATEGIES", "BatchedEvaluator", "precision_context",
           "resolve_precision", "run_with_backoff"]
