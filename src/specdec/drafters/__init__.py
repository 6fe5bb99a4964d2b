"""Draft models: DSpark (with DFlash as its Markov-free case) and Eagle3, with HF-style configs.

Both are registered with ``AutoConfig`` / ``AutoModel``, so a saved drafter directory loads with
``AutoModel.from_pretrained(path)``.
"""

from transformers import AutoConfig, AutoModel

from specdec.drafters.config import DSparkConfig
from specdec.drafters.dspark import DraftBlock, DraftContextCache, DSparkDrafter, DSparkTrainingOutput
from specdec.drafters.eagle3 import Eagle3Config, Eagle3Drafter, Eagle3TrainingOutput, vocabulary_from_counts
from specdec.drafters.options import DFlashOptions, DrafterOptions, DSparkOptions, Eagle3Options

for _config, _model in ((DSparkConfig, DSparkDrafter), (Eagle3Config, Eagle3Drafter)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)

__all__ = [
    "DFlashOptions",
    "DSparkConfig",
    "DSparkDrafter",
    "DSparkOptions",
    "DSparkTrainingOutput",
    "DraftBlock",
    "DraftContextCache",
    "DrafterOptions",
    "Eagle3Config",
    "Eagle3Drafter",
    "Eagle3Options",
    "Eagle3TrainingOutput",
    "vocabulary_from_counts",
]
