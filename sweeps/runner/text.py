"""Token sequences for the language model: the ``fortunes`` text and a synthetic stand-in.

``fortunes`` is the English text of the Debian package of that name
(version :data:`FORTUNES_VERSION`, with ``fortunes-min``, on which it
depends): the 43 files of :data:`FORTUNES_FILES` in
/usr/share/games/fortunes, about 15,000 fortunes and 2.6 MB. It is fixed:

- **text**: the files' bytes, in the order of :data:`FORTUNES_FILES`, whose
  SHA-256 must be :data:`FORTUNES_SHA256` (another version of the package
  is another data set, and is refused);
- **fortunes**: each file is cut at its lines "%" (the separator of the
  format) into fortunes; empty ones are dropped;
- **split**: a fixed, seeded :data:`TEST_FRACTION` of the fortunes is the
  test split, the rest the training split (a fortune never straddles
  them); each split is its fortunes in file order, each followed by the
  line "%";
- **tokens**: bytes (UTF-8 as stored), a vocabulary of 256, no other
  processing;
- **examples**: a split's token stream cut into windows of
  :data:`SEQUENCE_LENGTH` tokens; the label of each token is the next one
  (:func:`windows`).

The validation split is carved from the training windows like every data
set's (``Dataset.with_validation``).

``synthetic-text`` is a token stream with the same shape drawn from a
seeded Markov chain, for tests that must run anywhere.
"""

from __future__ import annotations

import hashlib
import pathlib
import re

import numpy as np
import torch

__all__ = [
    "FORTUNES_DIR",
    "FORTUNES_FILES",
    "FORTUNES_SHA256",
    "FORTUNES_VERSION",
    "SEQUENCE_LENGTH",
    "TEST_FRACTION",
    "VOCAB_SIZE",
    "fortunes_split",
    "markov_tokens",
    "read_fortunes",
    "windows",
]

FORTUNES_DIR = pathlib.Path("/usr/share/games/fortunes")
FORTUNES_VERSION = "1:1.99.1-7.3"
# Every fortune file of the packages fortunes and fortunes-min of FORTUNES_VERSION (not their .dat indexes
# and .u8 links); other packages put files in the same folder, which are not part of the data set.
FORTUNES_FILES = (
    "art", "ascii-art", "computers", "cookie", "debian", "definitions", "disclaimer", "drugs", "education",
    "ethnic", "food", "fortunes", "goedel", "humorists", "kids", "knghtbrd", "law", "linux", "linuxcookie",
    "literature", "love", "magic", "medicine", "men-women", "miscellaneous", "news", "paradoxum", "people", "perl",
    "pets", "platitudes", "politics", "pratchett", "riddles", "science", "songs-poems", "sports", "startrek", "tao",
    "translate-me", "wisdom", "work", "zippy",
)  # fmt: skip
FORTUNES_SHA256 = "fbc2d796dde8ea64a51345ce4c18ff486a778a2d2259603987073bedb3fc3cd7"  # of the files' bytes, in order
TEST_FRACTION = 0.1  # of the fortunes
TEST_SPLIT_SEED = 20_260  # the fixed choice of the test fortunes
SEQUENCE_LENGTH = 128  # tokens per example: most fortunes fit in two
VOCAB_SIZE = 256  # bytes
_SEPARATOR = b"%\n"


def read_fortunes(directory: pathlib.Path = FORTUNES_DIR) -> dict[str, bytes]:
    """The bytes of every file of :data:`FORTUNES_FILES` in ``directory``, by name.

    Raises:
        FileNotFoundError: files are missing; its message names them.
    """
    missing = [name for name in FORTUNES_FILES if not (directory / name).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"{shown} not found in {directory}")
    return {name: (directory / name).read_bytes() for name in FORTUNES_FILES}


def text_digest(files: dict[str, bytes]) -> str:
    """SHA-256 of the files' bytes in the order of :data:`FORTUNES_FILES`."""
    digest = hashlib.sha256()
    for name in FORTUNES_FILES:
        digest.update(files[name])
    return digest.hexdigest()


def fortunes_split(files: dict[str, bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """The token streams (int64, one token a byte) of the training and the test split."""
    fortunes = [
        fortune
        for name in FORTUNES_FILES
        for fortune in re.split(rb"(?m)^%\n", files[name])
        if fortune.strip()  # the text before a file's first separator, or after its last, may be empty
    ]
    rng = np.random.RandomState(TEST_SPLIT_SEED)
    test = np.zeros(len(fortunes), dtype=bool)
    test[rng.permutation(len(fortunes))[: round(TEST_FRACTION * len(fortunes))]] = True
    streams = [b"".join(f + _SEPARATOR for f, is_test in zip(fortunes, test) if is_test == wanted)
               for wanted in (False, True)]  # fmt: skip
    return tuple(torch.from_numpy(np.frombuffer(s, dtype=np.uint8).astype(np.int64)) for s in streams)


def windows(tokens: torch.Tensor, length: int = SEQUENCE_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """A token stream as examples: consecutive windows of ``length`` tokens (x) and the tokens one place
    later (y, the next token at every position), both (n, length); the last partial window is dropped."""
    n = (len(tokens) - 1) // length
    return tokens[: n * length].view(n, length), tokens[1 : n * length + 1].view(n, length)


def markov_tokens(n: int, seed: int, symbols: int = 16) -> torch.Tensor:
    """``n`` tokens of a seeded first-order Markov chain over the first ``symbols`` byte values of the
    lowercase letters ("a", "b", …): each symbol is followed by one of three others, with fixed
    probabilities. A language model can learn it (its entropy rate is below log 3 per token), and it
    runs anywhere."""
    generator = torch.Generator().manual_seed(seed)
    followers = torch.stack([torch.randperm(symbols, generator=generator)[:3] for _ in range(symbols)])
    weights = torch.softmax(2 * torch.randn(symbols, 3, generator=generator), dim=1)
    choices = torch.multinomial(weights, n, replacement=True, generator=generator)  # (symbols, n): a draw per step
    state, out = 0, torch.empty(n, dtype=torch.int64)
    for i in range(n):
        state = int(followers[state, choices[state, i]])
        out[i] = state
    return out + ord("a")
