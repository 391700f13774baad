"""Flax networks. Nothing here imports from methods/ or the trainer."""
