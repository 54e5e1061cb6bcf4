"""SQL fragments for the catalog's "newest row wins" rules, written once and shared by every stage.

Scores, verdicts and reviews are append-only; what counts is the newest row per image, and a human's
accept/reject beats the machine verdict (a 'skipped' or 'cleared' review falls back to the verdict).
"""

# Newest verdict / review per image, as sub-queries with columns (image_id, verdict) / (image_id, decision).
LATEST_VERDICT = """
SELECT v.image_id, v.verdict FROM verdicts v
JOIN (SELECT image_id, MAX(id) AS id FROM verdicts GROUP BY image_id) last ON last.id = v.id
"""
LATEST_REVIEW = """
SELECT r.image_id, r.decision FROM reviews r
JOIN (SELECT image_id, MAX(id) AS id FROM reviews GROUP BY image_id) last ON last.id = r.id
"""

# The decision that counts for image ``i``: the newest human accept/reject, else the newest verdict.
EFFECTIVE_DECISION = """CASE
  WHEN (SELECT r.decision FROM reviews r WHERE r.image_id = i.id ORDER BY r.id DESC LIMIT 1) IN ('accepted', 'rejected')
  THEN (SELECT r.decision FROM reviews r WHERE r.image_id = i.id ORDER BY r.id DESC LIMIT 1)
  ELSE (SELECT v.verdict FROM verdicts v WHERE v.image_id = i.id ORDER BY v.id DESC LIMIT 1) END"""

# Sources a human has not left out (a source is left out when its newest review is 'rejected', given with a
# reason on the review page): what enrich edits and passes as references.
KEPT_SOURCES = f"""
SELECT i.id, i.sha256 FROM images i LEFT JOIN ({LATEST_REVIEW}) lr ON lr.image_id = i.id
WHERE i.kind = 'source' AND (lr.decision IS NULL OR lr.decision != 'rejected') ORDER BY i.id
"""
