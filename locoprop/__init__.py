"""locoprop: LocoProp (layer-local loss optimization) for PyTorch.

``LocoPropOptimizer`` is the optimizer; ``locoprop.local`` holds the local
problem of one unit as pure functions; ``locoprop.inner`` the inner
optimizers, including TensorFlow-1 RMSProp (``RMSpropTF``).
"""

from locoprop.inner import RMSpropTF
from locoprop.optimizer import LocoPropOptimizer
from locoprop.transfer import Transfer

__all__ = ["LocoPropOptimizer", "RMSpropTF", "Transfer"]
__version__ = "0.1.0"
