"""Memory without a search: live-tensor tracking, the profile of one step, the estimate for a
device you do not have, and the kernels' scratch.

Internal: import the public names from :mod:`bsfinder`.
"""
