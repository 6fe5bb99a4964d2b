"""Draft models: DSpark (with DFlash as its Markov-free case) and their HF-style configs."""

from specdec.drafters.config import DSparkConfig
from specdec.drafters.dspark import DraftBlock, DraftContextCache, DSparkDrafter, DSparkTrainingOutput

__all__ = ["DSparkConfig", "DSparkDrafter", "DSparkTrainingOutput", "DraftBlock", "DraftContextCache"]
