"""What one training step is: loading the user's specs and objects, the step itself (outputs
released before backward), its losses, and the guard that leaves the user's state as found.

Internal: import the public names from :mod:`bsfinder`.
"""
