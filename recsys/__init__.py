"""recsys: an industrial recommender stack on TorchRec."""

import logging

__version__ = "0.1.0"

# torch.fx logs a one-off notice whenever torchrec asks is_fx_tracing(); it is not ours to act on.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
