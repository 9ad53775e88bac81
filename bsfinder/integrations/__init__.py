"""bsfinder inside the frameworks users train with.

Each integration is a module of its own, imported only when used (its framework is an
optional dependency): :mod:`bsfinder.integrations.lightning`,
:mod:`bsfinder.integrations.transformers`, :mod:`bsfinder.integrations.keras`,
:mod:`bsfinder.integrations.accelerate` and the pytest plugin
:mod:`bsfinder.integrations.pytest_plugin`. Every one of them probes in fresh processes
through :func:`bsfinder.find_batch_size` and returns (or sets) bsfinder's exact answer.
"""
