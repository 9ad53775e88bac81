"""Growing the batch during training: start small, grow as the gradient noise scale grows.

Early in training the noise scale is small, so small batches reach a loss fastest; it grows
as the loss falls (McCandlish et al. 2018), and with it the time-optimal batch. A training
loop measures it as it goes (:class:`~bsfinder.noise.scale.GradientNoise` on its accumulation
micro-batches) and asks :class:`BatchGrowth` for the batch and learning rate to use next:
the measured batch that minimises ``(B + B_noise) / samples/s``, never above the memory
maximum, never shrinking, with the learning rate from the noise-capped rule.

Example:
    >>> growth = BatchGrowth({32: 900.0, 64: 1500.0, 128: 2000.0, 256: 2100.0},
    ...                      max_batch=256, base_lr=0.1, base_batch=32)
    >>> growth.update(10.0)
    (32, 0.1)
    >>> growth.update(400.0)  # later in training: the noise scale has grown
    (128, 0.327)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from bsfinder.core.recommend import noise_capped_lr
from bsfinder.errors import SpecError

__all__ = ["BatchGrowth"]


class BatchGrowth:
    """The next batch size and learning rate for a training loop, from the noise scale.

    Args:
        throughputs: samples/s per batch size, measured (``from_result`` takes a probe's).
        max_batch: the largest batch that fits (never exceeded).
        base_lr: a learning rate that works at ``base_batch``.
        base_batch: the batch ``base_lr`` was tuned at, and the first batch suggested.
        optimizer: ``"sgd"``: the noise-capped rule; Adam-family: the square root of the
            same factor (the rule is derived for SGD; Adam scales more gently).
    """

    def __init__(
        self,
        throughputs: Mapping[int, float],
        *,
        max_batch: int,
        base_lr: float,
        base_batch: int,
        optimizer: str = "sgd",
    ) -> None:
        rates = {int(b): float(r) for b, r in throughputs.items() if b <= max_batch and r > 0}
        if not rates:
            raise SpecError("no measured throughput at or below the memory maximum")
        if base_lr <= 0 or base_batch < 1 or max_batch < 1:
            raise SpecError("base_lr, base_batch and max_batch must be positive")
        self.rates = dict(sorted(rates.items()))
        self.max_batch = max_batch
        self.base_lr = base_lr
        self.base_batch = base_batch
        self.optimizer = optimizer
        self.batch_size = min(base_batch, max_batch)
        self.lr = base_lr
        self.history: list[tuple[float, int, float]] = []

    @classmethod
    def from_result(
        cls, result: Any, *, base_lr: float, base_batch: int, optimizer: str | None = None
    ) -> BatchGrowth:
        """From a :class:`~bsfinder.core.results.ProbeResult`: its fitting trials' samples/s."""
        rates = {t.batch_size: t.samples_per_s for t in result.trials if t.fits and t.samples_per_s}
        if result.max_batch is None:
            raise SpecError("the probe found no batch that fits")
        return cls(
            rates,
            max_batch=result.max_batch,
            base_lr=base_lr,
            base_batch=base_batch,
            optimizer=optimizer or result.workload.get("optimizer", "sgd"),
        )

    def update(self, noise_scale: float | None) -> tuple[int, float]:
        """The batch and learning rate to train with now, given the latest noise scale
        (None or not finite: keep the current ones)."""
        if noise_scale is None or not math.isfinite(noise_scale) or noise_scale < 0:
            return self.batch_size, self.lr
        best = min(self.rates, key=lambda b: ((b + noise_scale) / self.rates[b], b))
        if best > self.batch_size:  # grow only: noise estimates fluctuate, training moves on
            self.batch_size = best
        lr = noise_capped_lr(self.base_lr, self.base_batch, self.batch_size, noise_scale)
        if self.optimizer != "sgd":
            lr = self.base_lr * math.sqrt(lr / self.base_lr)
        self.lr = float(f"{lr:.3g}")
        self.history.append((noise_scale, self.batch_size, self.lr))
        return self.batch_size, self.lr
