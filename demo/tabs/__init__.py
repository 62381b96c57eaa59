"""The demo's tabs, one module each, in page order; each has a `build(ctx)` that lays the tab out and wires it."""

from . import match, matrix, model, search

__all__ = ["match", "matrix", "model", "search"]
