"""Person segmentation with mediapipe's selfie segmenter (weights ship inside mediapipe 0.10.21).

One cached segmenter per model for the whole process, shared by the composite editor (cut-outs) and the
judge's change signal (subject vs background), created with mediapipe's native start-up chatter hidden.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from flywheel.errors import MissingExtraError


@functools.lru_cache(maxsize=2)
def selfie_segmenter(model_selection: int = 0):
    """mediapipe SelfieSegmentation (0: general 256x256, 1: landscape 144x256); MissingExtraError without it."""
    try:
        import mediapipe as mp
    except ImportError as err:
        raise MissingExtraError("mediapipe", "composite", "Person segmentation") from err
    import numpy as np

    with native_output_silenced():
        segmenter = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=model_selection)
        segmenter.process(np.zeros((64, 64, 3), np.uint8))  # the first call logs too
    return segmenter


@contextmanager
def native_output_silenced() -> Iterator[None]:
    """Hide the TFLite/absl lines mediapipe's C++ prints on first use (they break progress bars).

    They go through C stdio, so the C buffers are flushed before the real fds 1 and 2 come back.
    """
    import ctypes

    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        with open(os.devnull, "w") as null:
            for fd in saved:
                os.dup2(null.fileno(), fd)
            try:
                yield
            finally:
                ctypes.CDLL(None).fflush(None)
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
