"""Models for the integration tests (importable by the worker as tests.models)."""

from __future__ import annotations

import os

import torch
from torch import nn


def mlp(width: int = 512, hidden: int = 2048) -> nn.Module:
    """A model whose activations dominate: peak memory is close to linear in batch."""
    return nn.Sequential(
        nn.Linear(width, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


class BrokenAt(nn.Module):
    """Raises a non-OOM error (a user bug) from batch ``at`` on."""

    def __init__(self, at: int = 4) -> None:
        super().__init__()
        self.at = at
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= self.at:
            raise ValueError(f"shapes do not line up for {x.shape[0]} samples")
        return self.lin(x)


class AbortsAt(nn.Module):
    """The process dies (SIGABRT) from batch ``at`` on, like a native crash under pressure."""

    def __init__(self, at: int = 16) -> None:
        super().__init__()
        self.at = at
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= self.at:
            os.abort()
        return self.lin(x)


class NotAModel:
    """A class that is not an nn.Module."""


class DictOutput(nn.Module):
    """Returns a dict and a tuple inside it, like many real models."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> dict:
        h = self.a(x).relu()
        return {"logits": self.b(h), "aux": (h.mean(), None)}


def make_batch(batch_size: int) -> tuple[torch.Tensor]:
    return (torch.randn(batch_size, 512),)


STATE: dict = {}


def train_step(batch_size: int) -> None:
    """A user's own training step over a module-level model and optimizer."""
    if "model" not in STATE:
        STATE["model"] = mlp()
        STATE["opt"] = torch.optim.SGD(STATE["model"].parameters(), lr=0.01, momentum=0.9)
    model, opt = STATE["model"], STATE["opt"]
    loss = model(torch.randn(batch_size, 512)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


class DataDependent(nn.Module):
    """Keeps only the positive activations: an output shape that depends on the values."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y[y > 0]
