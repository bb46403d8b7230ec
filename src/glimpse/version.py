"""Glimpse's version: one place, read by the package (`glimpse.__version__`) and the server's /version."""

__version__ = "0.1.0"
