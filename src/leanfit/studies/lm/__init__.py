"""Language-model training shared by the LM experiments: configs, token batches and the accelerate loop."""

from leanfit.studies.lm.config import DataConfig, ModelConfig
from leanfit.studies.lm.train import TrainConfig, TrainResult, evaluate, next_token_loss, train_lm

__all__ = ["DataConfig", "ModelConfig", "TrainConfig", "TrainResult", "evaluate", "next_token_loss", "train_lm"]
