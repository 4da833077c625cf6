"""The pipeline's stages, one module each, listed here in DAG order."""

from pipeline.dag import Stage

STAGES: list[Stage] = []
