"""locoprop: LocoProp (layer-local loss optimization) for PyTorch; depends on torch only.

- ``optimizer``: ``LocoPropOptimizer``, a shell whose step runs the stages below;
- ``arguments``: checks of the constructor's arguments and of each group's hyperparameters;
- ``ownership``: which param group updates each parameter (tied weights, weights held outside units);
- ``collect``: gathering a step's local problems, every refusal before a change, and preparing their solves;
- ``solve_iterative``: the K lockstep inner iterations over all units;
- ``solve_exact``: the exact S solve of all units, in one process or on W ranks;
- ``adaptation``: γ adapted by hypergradients, as stages of the step;
- ``problem``: ``LocalProblem``, the typed record of one unit's problem in one step;
- ``local``: the local problem of one unit as pure functions (objective, residual, gradients by autograd);
- ``local_gradients``: the plan that computes all units' local gradients per inner iteration
  (the reference path, or batched kernels);
- ``kernels``: autograd-free kernels of linear units (batch and Gram forms);
- ``exact``: the math of the closed-form exact S solve, reference and fast;
- ``hypergrad``: the math of hypergradients of γ (sensitivities, the γ update);
- ``distributed``: the ranks of a process group and what LocoProp communicates;
- ``layers``: records of nn.Linear / nn.Conv2d layers (inputs, outputs, gradients), shared with K-FAC;
- ``units``: a recorded layer with its transfer function, and how units are found;
- ``output_unit``: the unit that produces the model's output, and the transfer function it gets;
- ``transfer``: transfer functions f, their convex integrals F and their cancellation-free changes;
- ``inner``: the inner optimizers, including TensorFlow-1 RMSProp (``RMSpropTF``).
"""

from locoprop.hypergrad import ADAPTIVE_GAMMA
from locoprop.inner import RMSpropTF
from locoprop.optimizer import LocoPropOptimizer
from locoprop.transfer import Transfer

__all__ = ["ADAPTIVE_GAMMA", "LocoPropOptimizer", "RMSpropTF", "Transfer"]
__version__ = "0.1.0"
