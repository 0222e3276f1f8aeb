"""locoprop: LocoProp (layer-local loss optimization) for PyTorch; depends on torch only.

- ``optimizer``: ``LocoPropOptimizer``, which gathers each step's local problems and runs their solves;
- ``local``: the local problem of one unit as pure functions (objective, residual, gradients by autograd);
- ``problem``: ``LocalProblem``, the typed record of one unit's problem in one step;
- ``local_gradients``: the plan that computes all units' local gradients per inner iteration
  (the reference path, or batched kernels);
- ``kernels``: autograd-free kernels of linear units (batch and Gram forms);
- ``exact``: the closed-form exact S solve, reference and fast;
- ``layers``: records of nn.Linear / nn.Conv2d layers (inputs, outputs, gradients), shared with K-FAC;
- ``units``: a recorded layer with its transfer function, and how units are found;
- ``transfer``: transfer functions f, their convex integrals F and their cancellation-free changes;
- ``inner``: the inner optimizers, including TensorFlow-1 RMSProp (``RMSpropTF``).
"""

from locoprop.inner import RMSpropTF
from locoprop.optimizer import LocoPropOptimizer
from locoprop.transfer import Transfer

__all__ = ["LocoPropOptimizer", "RMSpropTF", "Transfer"]
__version__ = "0.1.0"
