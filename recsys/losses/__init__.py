"""Losses: they take logits, labels and group ids, and know nothing of TorchRec or raw data."""
