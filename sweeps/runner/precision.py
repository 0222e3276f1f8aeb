"""A run's arithmetic precision (``--precision fp32|bf16``, config.json ``precision``).

- ``fp32``: everything in float32, as before the option existed.
- ``bf16``: mixed precision. The model's forward runs under
  ``torch.autocast(device_type, dtype=torch.bfloat16)`` (CPU and CUDA), so
  its matmuls and convolutions take bfloat16 operands, and the backward of
  those ops runs in the dtype their forward ran in. The weights, their
  gradients and every optimizer's state stay float32 (autocast casts a
  weight to bfloat16 for the op; the gradient flows back into the float32
  parameter), and the loss is taken in float32 from the output cast up.
  The iterative LocoProp optimizers (:data:`LOCAL_DTYPE_OPTIMIZERS`) also
  take ``local_dtype="bfloat16"``, their inner iterations' matmuls in
  bfloat16, unless the run sets ``local_dtype`` itself (``null`` keeps them in
  float32): those iterations are most of a LocoProp step's arithmetic, so
  that is where bfloat16 pays; the step stays accurate to about 1e-3 of
  itself (``locoprop.kernels``). Evaluation runs the forward as training does.

Every place that builds a run's optimizer or runs its forward (the training
loop, the pricing of a time budget, ``locoprop bench``) goes through
:func:`optimizer_hparams` and :func:`forward`, so that a step is priced in the
precision it trains in.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from baselines.registry import OPTIMIZERS
from sweeps.schema import DEFAULT_PRECISION, PRECISIONS

__all__ = [
    "DEFAULT_PRECISION",
    "LOCAL_DTYPE_OPTIMIZERS",
    "PRECISIONS",
    "autocast",
    "check_precision",
    "forward",
    "optimizer_hparams",
]

# The optimizers whose inner iterations take local_dtype (the exact solve has none).
LOCAL_DTYPE_OPTIMIZERS = tuple(name for name, spec in OPTIMIZERS.items() if "local_dtype" in spec.defaults)
# The dtype each precision's autocast runs the forward in (None: no autocast).
_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def check_precision(precision) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`; else ValueError naming it."""
    if precision not in PRECISIONS:
        raise ValueError(f"Invalid precision: {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return precision


def autocast(precision: str, device: torch.device | str):
    """The context a forward of ``precision`` runs in on ``device``: bfloat16 autocast for "bf16", none for
    "fp32"."""
    dtype = _AUTOCAST_DTYPES[check_precision(precision)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def forward(net: nn.Module, x: Tensor, precision: str, device: torch.device | str) -> Tensor:
    """``net(x)`` in ``precision``, returned in float32 for the loss (a no-op cast in "fp32")."""
    with autocast(precision, device):
        output = net(x)
    return output.float()


def optimizer_hparams(optimizer: str, hparams: dict, precision: str) -> dict:
    """The hyperparameters ``optimizer`` is built with in ``precision``: ``hparams``, and for "bf16" the
    iterative LocoProp optimizers' ``local_dtype="bfloat16"`` unless ``hparams`` sets ``local_dtype``."""
    if check_precision(precision) == "bf16" and optimizer in LOCAL_DTYPE_OPTIMIZERS and "local_dtype" not in hparams:
        return {**hparams, "local_dtype": "bfloat16"}
    return dict(hparams)
