#!/usr/bin/env bash
# Install everything the tests need (CPU torch from its pinned wheel, the package, test tools),
# then lint, type-check and run the fast test tier. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[test]"
ruff check bsfinder tests benchmarks examples
ruff format --check bsfinder tests benchmarks examples
mypy bsfinder
# two workers, each taking whole files (the torchrun tests of a file run one after another;
# a file's module fixtures are built once): the fast tier took 3 min 40 s on 2 cores for 355
# tests, 4 min 30 s for 397 (with tests/conftest.py's passive OpenMP waits; 5 min 00 s with
# spinning ones; 6 min 52 s in one process), 5 min 24 s for 456 with the integrations,
# 6 min 29 s for 495 with the LR range test, 7 min 11 s for 522 with the card presets and
# 9 min 39 s for 526 an hour later, 12 min 16 s and 12 min 52 s for 537 with checkpointing and
# the what-if table (CI's clean environment; the same machine varies that much).
# BSFINDER_TEST_WORKERS=0 runs it in this process.
python -m pytest -n "${BSFINDER_TEST_WORKERS:-2}" --dist loadfile "$@"
