"""Optimizers that torch and FBGEMM do not ship: FTRL-Proximal and group-lasso FTRL."""

from recsys.optim.ftrl import FTRL, GroupFTRL

__all__ = ["FTRL", "GroupFTRL"]
