"""Run by the tests under torchrun: ``find_batch_size`` inside an initialised process group.

Each rank gets its own memory limit (``--limits 256MiB,192MiB``) and writes its result (or
its error) to ``OUT/rank{N}.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch.distributed as dist

from bsfinder import find_batch_size
from bsfinder.errors import BsfinderError


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--model-kwargs", default="{}")
    parser.add_argument("--strategy", default=None)
    parser.add_argument("--limits", required=True)
    parser.add_argument("--max-batch", type=int, default=None)
    parser.add_argument("--base-lr", type=float, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = Path(args.out) / f"rank{rank}.json"
    try:
        result = find_batch_size(
            args.model,
            model_kwargs=json.loads(args.model_kwargs),
            input_shape=(args.width,),
            device="cpu",
            memory_limit=args.limits.split(",")[rank],
            strategy=args.strategy,
            max_batch=args.max_batch,
            granularity=8,
            steps=1,
            base_lr=args.base_lr,
            base_batch=8 if args.base_lr else None,
            optimizer="sgd",
        )
    except BsfinderError as exc:
        out.write_text(json.dumps({"error": str(exc), "type": type(exc).__name__}))
        return exc.exit_code
    finally:
        dist.destroy_process_group()
    result.save(str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
