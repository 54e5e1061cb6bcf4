"""Real, offline CPU signals computed from pixels (faces, perceptual hashes, quality, change).

These are measurements, never decisions: the judge records them as scores and a policy decides.
"""
