"""A model module that runs a parallel CPU op at import, as Keras 3, NumPy-initialised
weights or a position table built on the CPU do: it starts an OpenMP pool in whatever
process imports it (on 178d663 every trial forked from such a process hung)."""

import torch
from torch import nn

TABLE = torch.randn(512, 512) * 0.5
TABLE = TABLE @ TABLE  # big enough to run on every intra-op thread


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        with torch.no_grad():
            self.net[0].weight.copy_(TABLE[:256, :64])

    def forward(self, x):
        return self.net(x)
