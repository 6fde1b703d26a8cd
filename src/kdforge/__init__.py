"""kdforge: turn a large teacher model into a small, fast student."""

__version__ = "0.1.0"
