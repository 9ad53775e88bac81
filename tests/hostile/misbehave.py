"""A model that misbehaves the way buggy user code does: at one batch and above (``at``), or
at every batch including bsfinder's rehearsal on the meta device (``at=0``).

``how``: ``segv`` (killed by SIGSEGV), ``exit`` (``os._exit(3)``; ``exit0``, ``exit75``: 0 and 75),
``abort`` (SIGABRT),
``hang`` (waits forever), ``sysexit`` (raises SystemExit), ``interrupt`` (raises
KeyboardInterrupt), ``abort_if_oom`` (aborts where an allocation of 4 MiB per sample
fails, as C code that does not check ``malloc`` crashes: a crash that *is* memory).
"""

import os
import signal
import threading

import torch
from torch import nn


class Misbehave(nn.Module):
    def __init__(self, how: str = "segv", at: int = 16) -> None:
        super().__init__()
        self.how, self.at = how, at
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x):
        if self.how == "abort_if_oom" and x.device.type != "meta":
            try:
                torch.ones(x.shape[0], 1 << 20)
            except RuntimeError:
                os.abort()
        elif self.at == 0 or (x.device.type != "meta" and x.shape[0] >= self.at):
            if self.how == "segv":
                os.kill(os.getpid(), signal.SIGSEGV)
            elif self.how == "exit":
                os._exit(3)
            elif self.how == "exit0":  # without a result: not "fits", not a hang
                os._exit(0)
            elif self.how == "exit75":  # the code bsfinder's torchrun watchdog uses
                os._exit(75)
            elif self.how == "abort":
                os.abort()
            elif self.how == "hang":
                threading.Event().wait()
            elif self.how == "sysexit":
                raise SystemExit(4)
            elif self.how == "interrupt":
                raise KeyboardInterrupt
        return self.net(x)
