"""Flywheel: a handful of images of one character -> a clean, captioned training set and a FLUX LoRA,
improved in a loop (data flywheel) with a judge that learns from human review (judge flywheel).

Public entry points live in the stage modules (``flywheel.ingest.ingest`` ...) and ``flywheel.project``.
Nothing is imported or set up here: importing Flywheel does no work.
"""

__version__ = "0.1.0"
