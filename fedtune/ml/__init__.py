"""The model side of a round, shared by coordinator and contributors: base model loading and fingerprint,
LoRA attachment (FFA-LoRA's seed-derived A), campaign data, the per-sequence loss and held-out evaluation.

Nothing here knows about Flower, privacy accounting or the network.
"""
