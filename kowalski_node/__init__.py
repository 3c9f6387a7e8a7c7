"""kowalski-node: Recursive Language Model workflows across a home cluster, no coordinator."""

__version__ = "0.1.0"

__all__ = ["__version__"]
