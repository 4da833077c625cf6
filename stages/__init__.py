"""The pipeline's stages, one module each (train_vqgan's holds its second instance too, the
condition maps' train_cond_vqgan; train_transformer's its baseline without them), listed here in
DAG order."""

from pipeline.dag import Stage
from stages.sample import STAGE as SAMPLE
from stages.shard import STAGE as SHARD
from stages.tokenize import STAGE as TOKENIZE
from stages.train_transformer import BASELINE_STAGE as TRAIN_BASELINE_TRANSFORMER
from stages.train_transformer import STAGE as TRAIN_TRANSFORMER
from stages.train_vqgan import COND_STAGE as TRAIN_COND_VQGAN
from stages.train_vqgan import STAGE as TRAIN_VQGAN

STAGES: list[Stage] = [SHARD, TRAIN_VQGAN, TRAIN_COND_VQGAN, TOKENIZE, TRAIN_TRANSFORMER,
                       TRAIN_BASELINE_TRANSFORMER, SAMPLE]
