"""The model work that needs no torch: results (frozen, versioned JSON), the search, the
recommendations (with growth), comparing two results, scale-out, the memory-line fit.

Internal: import the public names from :mod:`bsfinder`.
"""
