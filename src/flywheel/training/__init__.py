"""Helpers of ``flywheel.train``: buckets, caches, checkpoints, LoRA file formats and the FLUX training step."""
