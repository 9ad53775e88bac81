"""The LR range test's fresh process: ``python -m bsfinder.lr._child JOB OUT``.

Reads the job (``torch.save`` of :func:`bsfinder.lr.range_test.find_lr`'s job), runs the
sweep, and appends one JSON line per step (``{"lr": ..., "loss": ...}``) to ``OUT``, then
an end line (``{"end": "diverged"}``, or ``{"end": "error", "error": {...}}``). Lines are
flushed as they are written: the parent reads what was measured even after a kill.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any


def main(job_path: str, out_path: str) -> int:
    import torch

    from bsfinder.errors import SpecError, UserCodeError
    from bsfinder.lr.range_test import _run_job

    with open(out_path, "a", encoding="utf-8") as out:

        def write(row: dict[str, Any]) -> None:
            out.write(json.dumps(row) + "\n")
            out.flush()

        def on_step(lr: float, loss: float) -> None:
            write({"lr": lr, "loss": loss if math.isfinite(loss) else None})

        try:
            job = torch.load(job_path, weights_only=False)
            curve = _run_job(job, on_step)
        except SpecError as exc:
            write({"end": "error", "error": {"kind": "spec", "message": str(exc)}})
            return 0
        except UserCodeError as exc:
            write({"end": "error", "error": {
                "kind": "model", "batch_size": exc.batch_size, "exc_type": exc.exc_type,
                "detail": exc.detail, "traceback": exc.traceback_text,
            }})  # fmt: skip
            return 0
        except KeyboardInterrupt:
            return 130
        write({"end": curve.stopped})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
