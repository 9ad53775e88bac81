"""Models for the integration tests (importable by the worker as tests.models)."""

from __future__ import annotations

import os
from collections.abc import Iterator

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


class LinearRegression(nn.Module):
    """``0.5 * mean((x.w - y)^2)``: its gradient noise scale is known in closed form.

    With ``x ~ N(0, I_d)``, ``y = x.w* + eps``, ``eps ~ N(0, sigma^2)`` and ``w = w* + delta``,
    the per-example gradient is ``x (x.delta - eps)``; Isserlis' theorem gives
    ``G = delta`` and ``Sigma = (|delta|^2 + sigma^2) I + delta delta^T``, so
    ``B_simple = (d (|delta|^2 + sigma^2) + |delta|^2) / |delta|^2``.
    """

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((x @ self.w - y) ** 2).mean()


def regression_loader(
    batch_size: int, *, dim: int = 16, sigma: float = 1.0, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches ``(x, y)`` with ``y = x.w* + eps``, ``w* = 0`` (see LinearRegression)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(batch_size, dim, generator=g)
        yield x, sigma * torch.randn(batch_size, generator=g)


def regression_model(dim: int = 16, delta: float = 1.0) -> LinearRegression:
    """A LinearRegression at ``w = w* + delta e_0`` (``|delta|^2 = delta**2``)."""
    model = LinearRegression(dim)
    with torch.no_grad():
        model.w[0] = delta
    return model


def regression_batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch for probing LinearRegression's memory and speed."""
    return torch.randn(batch_size, 16), torch.randn(batch_size)


class FailsOnRank(nn.Module):
    """Under torch.distributed, from batch ``at`` on one rank raises a non-OOM error
    (``how="raise"``) or dies with SIGABRT (``how="abort"``, like a native crash)."""

    def __init__(self, rank: int = 1, at: int = 4, how: str = "raise") -> None:
        super().__init__()
        self.rank = rank
        self.at = at
        self.how = how
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if dist.get_rank() == self.rank and x.shape[0] >= self.at:
            if self.how == "abort":
                os.abort()
            raise ValueError(f"rank {self.rank} cannot take {x.shape[0]} samples")
        return self.lin(x)


#: a fixed regression problem for the LR range test: one full batch, plain gradient descent
#: on ``0.5 * mean((X w - y)^2)`` diverges exactly above ``2 / L``, ``L`` the largest
#: eigenvalue of ``X^T X / n`` (:func:`fixed_regression_curvature`)
FIXED_N, FIXED_DIM = 512, 16


def _fixed_regression() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    scales = torch.linspace(0.5, 3.0, FIXED_DIM)  # an anisotropic design: L about 9
    x = torch.randn(FIXED_N, FIXED_DIM, generator=g) * scales
    y = x @ torch.ones(FIXED_DIM) + 0.1 * torch.randn(FIXED_N, generator=g)
    return x, y


def fixed_regression_curvature() -> float:
    """``L``: the largest eigenvalue of the loss's Hessian ``X^T X / n``."""
    x, _ = _fixed_regression()
    return float(torch.linalg.eigvalsh(x.T @ x / FIXED_N).max())


def fixed_regression_loader(batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole fixed data set as every batch (``batch_size`` is ignored: full batch)."""
    x, y = _fixed_regression()
    while True:
        yield x, y


def fixed_regression_model() -> LinearRegression:
    return LinearRegression(FIXED_DIM)


class ConstantLoss(nn.Module):
    """A model whose loss does not depend on its weights: no descent to read."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.w.sum() * 0 + 1.0


def slow_regression_loader(batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`fixed_regression_loader`, 0.1 s per batch: a sweep long enough to interrupt."""
    import time

    for batch in fixed_regression_loader(batch_size):
        time.sleep(0.1)
        yield batch


def vit(image_size: int = 32) -> nn.Module:
    """A small HF ViT from a config: its ``_init_weights`` calls ``trunc_normal_``, which
    reads values (torch 2.13: ``.item()``), so it cannot be built with fake tensors as is."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
        image_size=image_size, patch_size=8, num_labels=10,
    )  # fmt: skip
    return ViTForImageClassification(config)


class ReadsAValueWhenBuilt(nn.Module):
    """A constructor that reads a tensor's value (``.item()``): fine on real tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.scale = float(torch.ones(1).item()) + 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


def interrupted_regression_loader(batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`fixed_regression_loader` that raises ``KeyboardInterrupt`` at its 31st batch:
    a Ctrl-C in the middle of a sweep, at a known step."""
    for i, batch in enumerate(fixed_regression_loader(batch_size)):
        if i == 30:
            raise KeyboardInterrupt
        yield batch


class ResidualBlocks(nn.Module):
    """Residual MLP blocks in an ``nn.ModuleList``, as a transformer's layers are: each
    block keeps a hidden activation of ``4 * width`` per sample that checkpointing frees."""

    def __init__(self, width: int = 256, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
            for _ in range(depth)
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)
