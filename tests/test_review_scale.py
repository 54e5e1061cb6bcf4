"""Review at the scale of a real set: 1,000 edits load as one short page of thumbnails, in well under 2 s,
and a filter action decides all of them with one review row each.

The project is built straight into the catalog and the store (tiny images, no models), in about a second.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from flywheel import review

BASE = "http://127.0.0.1:8765"
RECIPES = ("forest", "beach", "studio", "city", "snow")
N_IMAGES = 1000


def build_big_project(root: Path, n: int = N_IMAGES) -> dict[str, int]:
    """A project with 5 sources and ``n`` judged edits: 60% accepted, 10% rejected, 30% needs review by
    the judge, each with scores, a caption and lineage. Returns counts by verdict."""
    import numpy as np
    from PIL import Image

    from flywheel.catalog.store import encode_png, sha256_bytes
    from flywheel.project import init_project, open_project

    init_project(root, name="Big Set", trigger="fw_big")
    rng = np.random.default_rng(0)
    verdicts = {"accepted": 0, "rejected": 0, "needs_review": 0}
    with open_project(root) as p:
        cat = p.catalog

        def put(size: int) -> str:  # the store's own layout, without an fsync per file (it is a test)
            data = encode_png(Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)))
            sha = sha256_bytes(data)
            path = p.store.image_path(sha)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            return sha

        with cat.transaction():
            sources = []
            for s in range(5):
                sha = put(48)
                sources.append(cat.insert("images", {
                    "sha256": sha, "pixel_sha256": sha, "phash": f"{s:016x}", "width": 48, "height": 48,
                    "kind": "source", "original_name": f"hero{s}.png", "original_sha256": sha}))
            ops = {r: cat.insert("operations", {"stage": "enrich", "kind": "model_call", "model": "composite",
                                                "params_json": json.dumps({"recipe": r}), "status": "ok"})
                   for r in RECIPES}
            for i in range(n):
                sha = put(24)
                recipe = RECIPES[i % len(RECIPES)]
                image_id = cat.insert("images", {
                    "sha256": sha, "pixel_sha256": sha, "phash": f"{1000 + i:016x}", "width": 24, "height": 24,
                    "kind": "enriched", "operation_id": ops[recipe]})
                cat.insert("image_parents", {"image_id": image_id, "parent_id": sources[i % 5], "role": "source"})
                distance = 0.3 + (i % 7) * 0.06
                for criterion, scorer, value, details in (
                        ("identity", "face:dlib_resnet_v1", distance, {"max_distance": 0.6,
                                                                       "closest_source_id": sources[i % 5]}),
                        ("edit_applied", "pixels:change", 0.2, {"min": 0.05}),
                        ("duplicate", "phash:dct64", 20 + i % 9, {"nearest_image_id": sources[0], "max_distance": 6})):
                    cat.insert("scores", {"image_id": image_id, "criterion": criterion, "scorer": scorer,
                                          "value": value, "details_json": json.dumps(details)})
                verdict = "accepted" if i % 10 < 6 else "rejected" if i % 10 == 6 else "needs_review"
                verdicts[verdict] += 1
                cat.insert("verdicts", {"image_id": image_id, "verdict": verdict, "reason": f"{verdict} by the policy"})
                cat.insert("captions", {"image_id": image_id, "text": f"fw_big, {recipe} scene {i}", "source": "vlm"})
    return verdicts


@pytest.fixture(scope="module")
def big_template(tmp_path_factory):
    root = tmp_path_factory.mktemp("big") / "proj"
    t0 = time.perf_counter()
    verdicts = build_big_project(root)
    assert time.perf_counter() - t0 < 30  # building must stay cheap: it runs in every CI run
    return root, verdicts


@pytest.fixture
def big(big_template, tmp_path):
    import shutil

    root, verdicts = big_template
    shutil.copytree(root, tmp_path / "big")
    return tmp_path / "big", verdicts


def test_a_thousand_image_review_page_loads_in_under_two_seconds(big):
    from starlette.testclient import TestClient

    from flywheel.web import create_app

    root, verdicts = big
    app = create_app(root, reviewer="tester")
    with TestClient(app, base_url=BASE) as c:
        timings = {}
        for name, url in (("default", "/"), ("all", "/?verdict=&review="), ("last page", "/?verdict=&review=&offset=960")):
            t0 = time.perf_counter()
            page = c.get(url)
            timings[name] = time.perf_counter() - t0
            assert page.status_code == 200
            cards = re.findall(r'<article class="card', page.text)
            images = re.findall(r'<img src="/image/(\d+)/(\w+)"[^>]*loading="lazy"', page.text)
            if name == "default":  # what needs a human: the judge's needs_review images only
                assert len(cards) == review.PAGE_SIZE and '<b data-count="remaining">300</b>' in page.text
                assert f'of <b data-count="matching">{verdicts["needs_review"]}</b>' in page.text
            elif name == "all":
                assert len(cards) == review.PAGE_SIZE and f"of <b data-count=\"matching\">{N_IMAGES}</b>" in page.text
                assert 'rel="next"' in page.text
            else:
                assert len(cards) == N_IMAGES - 960 and 'rel="next"' not in page.text
            # Thumbnails only (never /full in an <img>), each lazy: a page never pulls 1,000 full images.
            assert images and {kind for _, kind in images} == {"thumb"} and len(images) == 2 * len(cards)
            assert "face distance" in page.text and "(accept ≤ 0.60)" in page.text
        assert max(timings.values()) < 2.0, timings
        t0 = time.perf_counter()
        counts = c.get("/api/items", params={"verdict": "", "review": "", "limit": "0"}).json()["counts"]
        assert time.perf_counter() - t0 < 2.0 and counts["total"] == N_IMAGES


def test_accepting_a_whole_filter_of_hundreds_writes_one_row_each(big):
    from starlette.testclient import TestClient

    from flywheel.web import create_app

    root, verdicts = big
    app = create_app(root, reviewer="tester")
    with TestClient(app, base_url=BASE) as c:
        project = app.state.project
        filt = {"verdict": "needs_review", "review": "todo"}
        t0 = time.perf_counter()
        res = c.post("/review", json={"filter": filt, "expected": verdicts["needs_review"], "decision": "accepted"},
                     headers={"X-CSRF-Token": app.state.csrf})
        elapsed = time.perf_counter() - t0
        assert res.status_code == 200 and res.json()["recorded"] == verdicts["needs_review"]
        assert elapsed < 5.0, elapsed
        rows = project.catalog.query("SELECT image_id, decision, reviewer FROM reviews ORDER BY id")
        assert len(rows) == verdicts["needs_review"] == len({r["image_id"] for r in rows})
        assert {(r["decision"], r["reviewer"]) for r in rows} == {("accepted", "tester")}
        assert project.catalog.query("SELECT COUNT(*) FROM verdicts")[0][0] == N_IMAGES  # machine verdicts kept
        assert c.get("/api/items", params={**filt, "limit": "0"}).json()["counts"]["matching"] == 0
        # Undo, as the page does it: the previous decisions come back with the answer.
        previous = res.json()["previous"]
        assert set(previous.values()) == {None}
        undo = c.post("/review", json={"image_ids": [int(i) for i in previous], "decision": "cleared", "reason": "undo"},
                      headers={"X-CSRF-Token": app.state.csrf})
        assert undo.status_code == 200
        assert c.get("/api/items", params={**filt, "limit": "0"}).json()["counts"]["matching"] == verdicts["needs_review"]
