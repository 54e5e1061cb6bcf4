"""Sources are reviewable: per-source statistics, leaving one out of training (with a reason) from the
review page, and a frozen dataset that leaves it out."""

from __future__ import annotations

import pytest

from flywheel import review
from flywheel.errors import ReviewError

BASE = "http://127.0.0.1:8765"


def test_each_source_shows_what_its_edits_became(review_project):
    project, ids = review_project
    project.catalog.insert("scores", {"image_id": ids["sunset0"], "criterion": "identity",
                                      "scorer": "face:dlib_resnet_v1", "value": 0.55})  # a re-judge: newest counts
    review.record_review(project, [ids["sunset0"]], "rejected", "ann")  # a human beats needs_review
    stats = {s.id: s for s in review.list_sources(project)}
    assert list(stats) == [ids[f"src{i}"] for i in range(5)]
    src0 = stats[ids["src0"]]  # forest0 (judge: accepted) and sunset0 (judge: needs review, you: rejected)
    assert (src0.edits, src0.accepted, src0.rejected, src0.waiting, src0.decided_by_you) == (2, 1, 1, 0, 1)
    assert (src0.faces_measured, src0.face_distance_min, src0.face_distance_max) == (2, 0.31, 0.55)
    assert src0.face_distance_median == pytest.approx(0.43)
    assert src0.name == "astronaut_full.png" and not src0.left_out
    src2 = stats[ids["src2"]]  # sunset2: not judged yet, so it waits for a human
    assert (src2.edits, src2.accepted, src2.rejected, src2.waiting) == (1, 0, 0, 1)
    src4 = stats[ids["src4"]]
    assert (src4.edits, src4.faces_measured, src4.face_distance_median) == (0, 0, None)


def test_a_source_left_out_on_the_page_is_left_out_of_the_dataset(review_project):
    from starlette.testclient import TestClient

    from flywheel.dataset import RULE, freeze_dataset
    from flywheel.web import create_app

    project, ids = review_project
    src1 = ids["src1"]
    app = create_app(project.root, reviewer="tester")
    with TestClient(app, base_url=BASE, follow_redirects=False) as c:
        form = {"image_id": str(src1), "decision": "rejected", "csrf_token": app.state.csrf,
                "next": f"/sources#source-{src1}"}
        # 1. A reason is required: leaving a source out is a decision someone will want explained.
        res = c.post("/review", data={**form, "reason": "  "})
        assert res.status_code == 400 and res.json()["error"] == "leaving a source out of training needs a reason"
        with pytest.raises(ReviewError, match="needs a reason"):
            review.record_review(project, [src1], "rejected", "ann")
        res = c.post("/review", data={**form, "reason": "another person's face"})
        assert res.status_code == 303 and res.headers["location"] == f"/sources#source-{src1}"
        # 2. The sources page and the grid say so.
        page = c.get("/sources").text
        assert f'id="source-{src1}" data-id="{src1}"\n           data-left-out="1"' in page
        assert "Left out of training</b>: another person&#39;s face" in page
        assert "Sources (5, 1 left out)" in page
        grid = c.get("/", params={"verdict": "", "review": "", "source": str(src1)}).text
        assert f"source #{src1} · left out" in grid and f'id="item-{ids["forest1"]}"' in grid
        assert f'id="item-{ids["forest0"]}"' not in grid  # source=ID: only the edits made from it
    # 3. Dataset freeze leaves it out (its edit forest1 is decided on its own: the judge rejected it).
    members = [m.image_id for m in freeze_dataset(project, 1).members]
    assert src1 not in members and {ids[f"src{i}"] for i in (0, 2, 3, 4)} <= set(members)
    assert project.catalog.query("SELECT rule FROM dataset_versions")[0][0] == RULE
    # 4. Put back: the next version has it again; history keeps both decisions.
    review.record_review(project, [src1], "accepted", "ann", reason="put back")
    assert src1 in [m.image_id for m in freeze_dataset(project, 1).members]
    assert [tuple(r) for r in project.catalog.query(
        "SELECT decision, reason FROM reviews WHERE image_id = ? ORDER BY id", (src1,))] == [
        ("rejected", "another person's face"), ("accepted", "put back")]
