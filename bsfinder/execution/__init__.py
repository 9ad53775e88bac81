"""Where and how trials run: the runner interface, one trial, the process runner and its
worker, the inline runner, the placement decision (what can travel), distributed probes.

Internal: import the public names from :mod:`bsfinder`.
"""
