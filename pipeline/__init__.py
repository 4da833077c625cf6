"""Taming Transformers as one distributed, resumable Ray pipeline (nothing heavy at import)."""

__version__ = "0.1.0"
