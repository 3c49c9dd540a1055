"""mgtq: compression toolkit for masked generative transformers (Meissonic first)."""

__version__ = "0.1.0"
