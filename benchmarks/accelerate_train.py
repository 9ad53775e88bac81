"""The training function of benchmarks/integration_accelerate.py and
tests/test_integration_accelerate.py: an Accelerate loop (``Accelerator``, ``prepare``,
``accelerator.backward``) over a shuffled ``DataLoader``, AdamW, at most ``max_steps`` steps."""

from __future__ import annotations

import torch
from accelerate import Accelerator

#: samples in the data set (16 MiB of float32 inputs)
SAMPLES = 16384


def train(batch_size: int, width: int = 4096, max_steps: int = 5) -> int:
    """Train a 64 -> ``width`` -> 10 MLP at ``batch_size``; returns the steps run."""
    accelerator = Accelerator(cpu=True)
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 10)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.utils.data.TensorDataset(
        torch.randn(SAMPLES, 64, generator=generator),
        torch.randint(0, 10, (SAMPLES,), generator=generator),
    )
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps = 0
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
        if steps == max_steps:
            break
    return steps
