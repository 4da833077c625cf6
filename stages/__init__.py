"""The pipeline's stages, one module each, listed here in DAG order."""

from pipeline.dag import Stage
from stages.shard import STAGE as SHARD

STAGES: list[Stage] = [SHARD]
