"""The CURVES images: our seeded generator of the published recipe (a stand-in).

Hinton & Salakhutdinov (Science 2006) trained their 784-400-200-100-50-25-6
autoencoder on "synthetic images of curves that were generated from three
randomly chosen points in two dimensions", 28×28 grey pixels; Martens (2010)
and the K-FAC paper (Martens & Grosse 2015) used the same file, 20,000
training and 10,000 test images. That file cannot be fetched here and its
generator was never published, so this module draws curves by the same
recipe, with rendering choices of our own:

- each curve is a quadratic Bézier curve whose three control points are
  drawn uniformly in [:data:`MARGIN`, 27 − :data:`MARGIN`]² (pixel
  centres at 0..27): six numbers per image, the size of the code layer. The
  curve runs between the two points farthest apart and bends towards the
  third, so it stays inside their triangle and inside the image;
- it is rendered as a pen stroke: :data:`SAMPLES` points evenly spaced in
  the curve parameter, and each pixel's intensity is exp(−d²/(2σ²)), d its
  distance to the nearest of them, σ = :data:`STROKE_SIGMA` pixels (a
  sample reaches the 9×9 pixels around it; beyond, the value is below
  4e-4). Pixels are in [0, 1], 1 on the stroke.

Everything is drawn from one ``torch.Generator`` seeded by ``seed``, so the
same seed gives the same images on every machine with the same torch.
"""

from __future__ import annotations

import torch

__all__ = ["MARGIN", "SAMPLES", "SIDE", "STROKE_SIGMA", "curve_images"]

SIDE = 28  # pixels per side
MARGIN = 1.0  # control points keep this far from the border: a stroke is never cut through its middle
SAMPLES = 64  # points along a curve: under a pixel apart on the longest curves
STROKE_SIGMA = 1.0  # pixels: a stroke about three pixels wide
_REACH = 4  # pixels: a sample lights the 9×9 pixels around it
_CANVAS = SIDE + 2 * _REACH  # the image and a border where the patches of samples near its edge spill
_CHUNK = 1024  # images rendered at once: (1024, 64, 81) tensors of 21 or 42 MB


def curve_images(n: int, seed: int) -> torch.Tensor:
    """``n`` curve images, float32 of shape (n, 784) in [0, 1], the same for the same ``n`` and ``seed``.

    The first k images of ``curve_images(n, seed)`` are those of ``curve_images(k, seed)``: the control
    points are drawn before anything is rendered.
    """
    generator = torch.Generator().manual_seed(seed)
    points = MARGIN + (SIDE - 1 - 2 * MARGIN) * torch.rand(n, 3, 2, generator=generator, dtype=torch.float64)
    return torch.cat([_render(_as_control(points[start : start + _CHUNK])) for start in range(0, n, _CHUNK)])


def _as_control(points: torch.Tensor) -> torch.Tensor:
    """The three points of each curve (k, 3, 2) reordered so that the two farthest apart are its ends: long
    strokes that bend, rather than short hooks doubling back."""
    ends = torch.tensor([[1, 2], [0, 2], [0, 1]])  # the ends when point i is the one they bend towards
    gaps = torch.stack([(points[:, a] - points[:, b]).norm(dim=1) for a, b in ends.tolist()], dim=1)
    bend = gaps.argmax(dim=1)  # the point opposite the longest side
    first, last = ends[bend, 0], ends[bend, 1]
    rows = torch.arange(len(points))
    return torch.stack([points[rows, first], points[rows, bend], points[rows, last]], dim=1)


def _render(control: torch.Tensor) -> torch.Tensor:
    """Images of the quadratic Bézier curves with ``control`` points (k, 3, 2), as (k, 784) float32.

    Each sample of the curve lights the 9×9 pixels around it, and a pixel keeps the largest of its values:
    the maximum over samples, whatever their order.
    """
    t = torch.linspace(0.0, 1.0, SAMPLES, dtype=torch.float64)[:, None]
    # B(t) = (1 − t)² P0 + 2t(1 − t) P1 + t² P2 for every curve and sample: (k, SAMPLES, 2), x then y
    points = (1 - t) ** 2 * control[:, None, 0] + 2 * t * (1 - t) * control[:, None, 1] + t**2 * control[:, None, 2]
    centre = points.round()
    offset = (points - centre).float()  # the sample's place within its pixel, in [-½, ½]
    reach = torch.arange(-_REACH, _REACH + 1)
    # exp(−d²/2σ²) is the product of a factor across and a factor down: (k, SAMPLES, 9) each, then 9×9.
    across, down = ((reach - offset[..., axis, None]).square_().mul_(-0.5 / STROKE_SIGMA**2).exp_() for axis in (0, 1))
    values = (down[..., :, None] * across[..., None, :]).flatten(2)  # (k, SAMPLES, 81), row by row
    centre = centre.long()
    patch = (reach[:, None] * _CANVAS + reach[None, :]).flatten()  # the 9×9 canvas pixels around pixel 0
    # On a canvas with a border of _REACH pixels, where every patch lands whole; the image is its inside.
    index = ((centre[..., 1] + _REACH) * _CANVAS + centre[..., 0] + _REACH)[..., None] + patch
    canvas = torch.zeros(len(control), _CANVAS * _CANVAS)
    canvas.scatter_reduce_(1, index.flatten(1), values.flatten(1), reduce="amax")
    inside = slice(_REACH, _REACH + SIDE)
    return canvas.view(-1, _CANVAS, _CANVAS)[:, inside, inside].reshape(-1, SIDE * SIDE)
