"""ltdd: dataset distillation on long-tailed image data."""

__version__ = "0.1.0"
