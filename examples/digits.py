"""A real, bundled data set for learning-rate checks: scikit-learn's ``load_digits``.

1797 grey 8x8 images of hand-written digits, 10 classes, shipped inside scikit-learn (no
download). ``load`` gives a fixed, stratified 80/20 train/test split scaled to [0, 1];
``DigitsNet`` is a small CNN that returns its own cross-entropy loss when given labels, so
``model(*batch)`` is the training loss; ``make_loader`` is an endless, seeded, shuffled
iterator of training batches.

    bsfinder probe examples/digits.py:DigitsNet --input 1x8x8 --memory-limit 512MiB

Needs ``pip install scikit-learn``.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TEST_FRACTION = 0.2


@lru_cache(maxsize=8)
def _split(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train and test tensors for one split seed (cached: the split is deterministic)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32").reshape(-1, 1, 8, 8)
    y = digits.target.astype("int64")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, stratify=y, random_state=seed
    )
    return (
        torch.from_numpy(x_train),
        torch.from_numpy(y_train),
        torch.from_numpy(x_test),
        torch.from_numpy(y_test),
    )


def load(split: str = "train", seed: int = 0) -> tuple[Tensor, Tensor]:
    """Images and labels of one split: ``(N, 1, 8, 8)`` float32 in [0, 1], ``(N,)`` int64.

    The 80/20 split is stratified by class and fixed by ``seed`` (1437 train, 360 test).
    """
    x_train, y_train, x_test, y_test = _split(seed)
    if split == "train":
        return x_train, y_train
    if split == "test":
        return x_test, y_test
    raise ValueError(f"split must be 'train' or 'test', not {split!r}")


class DigitsNet(nn.Module):
    """A small CNN for 8x8 digits: two 3x3 convolutions (no padding), then a linear layer;
    ``batchnorm=True`` puts a ``BatchNorm2d`` after each convolution (which then has no
    bias), as ResNet-style blocks do.

    ``forward(x)`` returns the logits; ``forward(x, y)`` the mean cross-entropy loss.
    """

    def __init__(self, channels: int = 32, num_classes: int = 10, batchnorm: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, bias=not batchnorm)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, bias=not batchnorm)
        self.norm1: nn.Module = nn.BatchNorm2d(channels) if batchnorm else nn.Identity()
        self.norm2: nn.Module = nn.BatchNorm2d(2 * channels) if batchnorm else nn.Identity()
        self.head = nn.Linear(2 * channels * 4 * 4, num_classes)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Logits ``(N, num_classes)`` when ``y`` is None, else the mean cross-entropy."""
        h = F.relu(self.norm1(self.conv1(x)))
        h = F.relu(self.norm2(self.conv2(h)))
        logits = self.head(h.flatten(1))
        if y is None:
            return logits
        return F.cross_entropy(logits, y)


def make_loader(batch_size: int, seed: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled training batches ``(x, y)`` without end.

    Reshuffles every epoch with a ``torch.Generator`` seeded by ``seed`` and drops the last
    partial batch, so an epoch is ``len(train) // batch_size`` steps of exactly
    ``batch_size`` samples. The split is the one ``load("train", seed=0)`` gives.
    """
    x, y = load("train")
    n = len(y)
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], not {batch_size}")
    generator = torch.Generator().manual_seed(seed)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - batch_size + 1, batch_size):
                index = order[start : start + batch_size]
                yield x[index], y[index]

    return batches()


def DigitsNetBN(channels: int = 32, num_classes: int = 10) -> DigitsNet:
    """:class:`DigitsNet` with BatchNorm (a factory, for ``examples.digits:DigitsNetBN``)."""
    return DigitsNet(channels, num_classes, batchnorm=True)
