"""The pipeline's stages, one module each, listed here in DAG order."""

from pipeline.dag import Stage
from stages.sample import STAGE as SAMPLE
from stages.shard import STAGE as SHARD
from stages.tokenize import STAGE as TOKENIZE
from stages.train_transformer import STAGE as TRAIN_TRANSFORMER
from stages.train_vqgan import STAGE as TRAIN_VQGAN

STAGES: list[Stage] = [SHARD, TRAIN_VQGAN, TOKENIZE, TRAIN_TRANSFORMER, SAMPLE]
