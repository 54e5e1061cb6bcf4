"""Append-only catalog migrations.

Rules (see docs/catalog.md):
- Never edit or reorder a migration that has shipped; append a new one.
- Each migration runs in one transaction together with the row that records it, so a failure leaves
  the catalog exactly as it was.
- Machine scores/verdicts and human reviews live in separate tables; nothing ever overwrites a score,
  verdict or review (corrections are new rows; the newest row wins when reading).
"""

from __future__ import annotations

MIGRATIONS: list[tuple[str, str]] = []


def migration(name: str, sql: str) -> None:
    MIGRATIONS.append((name, sql))


migration(
    "m001_initial",
    """
-- Every model call or stage run leaves a row, like `llm` logs every prompt.
CREATE TABLE operations (
    id            INTEGER PRIMARY KEY,
    stage         TEXT NOT NULL,               -- ingest / enrich / caption / judge / train / ...
    kind          TEXT NOT NULL CHECK (kind IN ('stage_run', 'model_call')),
    parent_id     INTEGER REFERENCES operations(id),  -- the stage run a model call belongs to
    work_key      TEXT UNIQUE,                 -- idempotency key of a planned unit of work (resume)
    model         TEXT,                        -- hub id, local path or backend name
    params_json   TEXT NOT NULL DEFAULT '{}',  -- prompt, steps, guidance, ... (resolved, not defaults)
    seed          INTEGER,
    status        TEXT NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'ok', 'failed', 'skipped')),
    error         TEXT,
    started_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    duration_ms   INTEGER
);
CREATE INDEX operations_stage ON operations(stage, status);

CREATE TABLE images (
    id            INTEGER PRIMARY KEY,
    sha256        TEXT NOT NULL UNIQUE,        -- of the stored (normalised PNG) file: its name in the store
    pixel_sha256  TEXT NOT NULL,               -- of the decoded RGB pixels: exact-duplicate detection
    phash         TEXT NOT NULL,               -- 64-bit perceptual hash, hex: near-duplicate detection
    width         INTEGER NOT NULL,
    height        INTEGER NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('source', 'enriched', 'synthetic')),
    round         INTEGER NOT NULL DEFAULT 0,  -- 0: sources and their edits; k: made by LoRA round k
    operation_id  INTEGER REFERENCES operations(id),  -- the call that produced it (NULL for sources)
    original_name TEXT,                        -- sources: the user's file name (never modified)
    original_path TEXT,                        -- sources: where it was ingested from
    original_sha256 TEXT,                      -- sources: of the user's file bytes, kept in the store
    notes         TEXT,                        -- normalisation applied at ingest (CMYK->RGB, frame 0, ...)
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX images_kind_round ON images(kind, round);
CREATE INDEX images_pixel ON images(pixel_sha256);
CREATE UNIQUE INDEX images_original ON images(original_sha256) WHERE original_sha256 IS NOT NULL;

-- Lineage: an image can have several parents (the edited source plus extra reference images).
CREATE TABLE image_parents (
    image_id      INTEGER NOT NULL REFERENCES images(id),
    parent_id     INTEGER NOT NULL REFERENCES images(id),
    role          TEXT NOT NULL DEFAULT 'source' CHECK (role IN ('source', 'reference')),
    PRIMARY KEY (image_id, parent_id)
);

CREATE TABLE faces (
    id            INTEGER PRIMARY KEY,
    image_id      INTEGER NOT NULL REFERENCES images(id),
    detector      TEXT NOT NULL,
    left_px       INTEGER NOT NULL,
    top_px        INTEGER NOT NULL,
    right_px      INTEGER NOT NULL,
    bottom_px     INTEGER NOT NULL,
    score         REAL,
    embedding     BLOB,                        -- float32 vector (e.g. 128-d dlib identity), optional
    embedder      TEXT,
    operation_id  INTEGER REFERENCES operations(id)
);
CREATE INDEX faces_image ON faces(image_id);

CREATE TABLE captions (
    id            INTEGER PRIMARY KEY,
    image_id      INTEGER NOT NULL REFERENCES images(id),
    text          TEXT NOT NULL,
    source        TEXT NOT NULL CHECK (source IN ('vlm', 'template', 'human')),
    operation_id  INTEGER REFERENCES operations(id),
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX captions_image ON captions(image_id);

-- Scores are numbers, never decisions. One row per (image, criterion, scorer, run).
CREATE TABLE scores (
    id            INTEGER PRIMARY KEY,
    image_id      INTEGER NOT NULL REFERENCES images(id),
    criterion     TEXT NOT NULL,               -- identity / edit_applied / quality / duplicate / ...
    scorer        TEXT NOT NULL,               -- e.g. face:dlib_resnet_v1, vlm:Qwen/Qwen2-VL-2B-Instruct
    value         REAL,                        -- NULL when the scorer could not score (see details)
    details_json  TEXT NOT NULL DEFAULT '{}',
    operation_id  INTEGER REFERENCES operations(id),
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX scores_image ON scores(image_id, criterion);

-- Machine verdicts: the judge policy applied to scores. Newest row per image wins.
CREATE TABLE verdicts (
    id            INTEGER PRIMARY KEY,
    image_id      INTEGER NOT NULL REFERENCES images(id),
    verdict       TEXT NOT NULL CHECK (verdict IN ('accepted', 'rejected', 'needs_review')),
    reason        TEXT NOT NULL,
    policy_json   TEXT NOT NULL DEFAULT '{}',
    operation_id  INTEGER REFERENCES operations(id),
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX verdicts_image ON verdicts(image_id);

-- Human decisions: a separate table, so a review never overwrites a machine verdict.
-- Undo is a new row with decision 'cleared'; the newest row per image wins.
CREATE TABLE reviews (
    id            INTEGER PRIMARY KEY,
    image_id      INTEGER NOT NULL REFERENCES images(id),
    decision      TEXT NOT NULL CHECK (decision IN ('accepted', 'rejected', 'skipped', 'cleared')),
    reason        TEXT,
    reviewer      TEXT NOT NULL,
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX reviews_image ON reviews(image_id);

-- A frozen training set: which images with which captions.
CREATE TABLE dataset_versions (
    id            INTEGER PRIMARY KEY,
    version       INTEGER NOT NULL UNIQUE,     -- v1, v2, ...
    round         INTEGER NOT NULL,
    rule          TEXT NOT NULL,               -- how membership was decided (human over machine, ...)
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE TABLE dataset_members (
    dataset_id    INTEGER NOT NULL REFERENCES dataset_versions(id),
    image_id      INTEGER NOT NULL REFERENCES images(id),
    caption_id    INTEGER REFERENCES captions(id),
    PRIMARY KEY (dataset_id, image_id)
);

CREATE TABLE lora_runs (
    id            INTEGER PRIMARY KEY,
    round         INTEGER NOT NULL,
    dataset_id    INTEGER NOT NULL REFERENCES dataset_versions(id),
    base_model    TEXT NOT NULL,
    config_json   TEXT NOT NULL,
    output_dir    TEXT NOT NULL,
    status        TEXT NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'ok', 'failed')),
    operation_id  INTEGER REFERENCES operations(id),
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at   TEXT
);

-- Files a run leaves behind: LoRA weights, checkpoints, samples, loss curves, reports, judge adapters.
CREATE TABLE artifacts (
    id            INTEGER PRIMARY KEY,
    kind          TEXT NOT NULL,
    path          TEXT NOT NULL,               -- relative to the project's .flywheel/ folder
    sha256        TEXT,
    lora_run_id   INTEGER REFERENCES lora_runs(id),
    operation_id  INTEGER REFERENCES operations(id),
    step          INTEGER,
    meta_json     TEXT NOT NULL DEFAULT '{}',
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX artifacts_kind ON artifacts(kind, lora_run_id);

CREATE TABLE evaluations (
    id            INTEGER PRIMARY KEY,
    baseline_run_id  INTEGER REFERENCES lora_runs(id),
    candidate_run_id INTEGER REFERENCES lora_runs(id),
    metrics_json  TEXT NOT NULL,
    verdict       TEXT NOT NULL CHECK (verdict IN ('better', 'worse', 'no_significant_change')),
    report_path   TEXT,
    operation_id  INTEGER REFERENCES operations(id),
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
""",
)


migration(
    "m002_image_purpose",
    """
-- Evaluation images (held-out prompts x fixed seeds) are judged and measured but must never enter a
-- training set, or later rounds would be evaluated on what they trained on.
ALTER TABLE images ADD COLUMN purpose TEXT NOT NULL DEFAULT 'train' CHECK (purpose IN ('train', 'eval'));
""",
)


migration(
    "m003_judge_adapters",
    """
-- Every judge fine-tuning attempt (flywheel tune-judge): a LoRA on the judge VLM learned from human reviews.
-- The active judge adapter for a base model is its newest promoted row; attempts that did not beat the
-- judge before them stay here (with their held-out metrics) but are never used.
CREATE TABLE judge_adapters (
    id            INTEGER PRIMARY KEY,
    base_model    TEXT NOT NULL,               -- the judge VLM the adapter was trained on (preset, folder or hub id)
    path          TEXT NOT NULL,               -- adapter folder, relative to the project's .flywheel/ folder
    data_hash     TEXT NOT NULL,               -- sha256 of the SFT examples (image sha, decision, reason, prompt)
    config_json   TEXT NOT NULL DEFAULT '{}',  -- [tune_judge] settings, split, class balance
    metrics_json  TEXT NOT NULL DEFAULT '{}',  -- held-out agreement before / after / of the incumbent, losses
    status        TEXT NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'ok', 'failed')),
    promoted      INTEGER NOT NULL DEFAULT 0 CHECK (promoted IN (0, 1)),
    operation_id  INTEGER REFERENCES operations(id),
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at   TEXT
);
CREATE INDEX judge_adapters_base ON judge_adapters(base_model, promoted);
""",
)


migration(
    "m004_operation_output",
    """
-- The image an operation produced. images.operation_id names only the FIRST producer of a picture (the
-- store is content-addressed); when a later call yields the same pixels (e.g. two LoRA rounds rendering
-- one held-out prompt identically), this column still links that call to its output.
ALTER TABLE operations ADD COLUMN output_image_id INTEGER REFERENCES images(id);
CREATE INDEX operations_output ON operations(output_image_id);
""",
)


migration(
    "m008_judge_split_groups",
    """
-- The train / held-out side of every review group flywheel tune-judge has seen (a source image, or a
-- generation prompt: judge_tuning.dataset). A group gets its side once, when it first appears, and keeps
-- it: every later attempt is measured on the same held-out groups, so an adapter is never measured on
-- what an earlier one trained on. Rows are only ever added.
CREATE TABLE judge_split_groups (
    group_key     TEXT PRIMARY KEY,            -- "source:<id>", "prompt:<text>" or "image:<id>"
    side          TEXT NOT NULL CHECK (side IN ('train', 'held_out')),
    attempt_id    INTEGER REFERENCES judge_adapters(id),  -- the attempt that first assigned it
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
""",
)
