"""Flywheel 2: the judge learns from human reviews (``flywheel tune-judge``, docs/tune_judge.md).

- ``prompt``: the one "keep?" question the tuned judge is trained on and asked (shared with ``judge``);
- ``dataset``: SFT examples from the reviews table, split by source image, hashed;
- ``train``: LoRA / QLoRA on the judge VLM with answer-only loss, checkpoints and resume;
- ``metrics``: agreement with held-out human decisions (accuracy, reject precision/recall, kappa, calibration)
  and the bootstrap interval of a kappa gain, resampling held-out groups;
- ``incumbent``: what a tuned judge must beat, the verdicts the judge recorded under today's policy;
- ``adapters``: which adapter is active, and putting one on a loaded judge.
"""
