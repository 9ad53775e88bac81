"""A model module that creates a CUDA tensor at import: a fork server that imported it could
not give its children CUDA, so bsfinder imports it in each trial process instead."""

import torch
from torch import nn

ON_GPU = torch.ones(1024, device="cuda")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x):
        return self.net(x)
