"""The gradient noise scale: the estimator, and measuring it on the user's data.

Internal: import the public names from :mod:`bsfinder`.
"""
