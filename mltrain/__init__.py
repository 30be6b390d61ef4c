"""mltrain: metric-learning training, evaluation and search on timm backbones."""

__version__ = "0.1.0"
