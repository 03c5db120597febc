"""Training: sharding plans (planning.py), and later the DMP trainer, checkpoints and launch helpers.

Nothing here is imported by ``recsys.data``; the CLI imports these modules lazily.
"""
