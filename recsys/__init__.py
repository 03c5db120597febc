"""recsys: an industrial recommender stack on TorchRec."""

__version__ = "0.1.0"
