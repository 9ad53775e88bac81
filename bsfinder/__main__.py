"""``python -m bsfinder`` (and ``torchrun -m bsfinder``) runs the CLI."""

from bsfinder.cli import main

if __name__ == "__main__":
    main()
