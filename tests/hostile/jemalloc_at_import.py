"""A model whose module imports pyarrow (as pandas, and with it Keras 3, does): pyarrow's
bundled jemalloc starts its background thread, ``jemalloc_bg_thd``, at import. jemalloc
makes fork safe itself, so the fork server keeps the import (before: every trial imported
the module afresh, 5.3 s a trial for a Keras model instead of 0.7 s)."""

import pyarrow  # noqa: F401
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)
