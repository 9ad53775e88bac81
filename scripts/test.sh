#!/usr/bin/env bash
# Install everything the tests need (CPU torch from its pinned wheel, the package, test tools),
# then lint, type-check and run the fast test tier. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[test]"
ruff check bsfinder tests benchmarks examples
ruff format --check bsfinder tests benchmarks examples
mypy bsfinder
python -m pytest "$@"
