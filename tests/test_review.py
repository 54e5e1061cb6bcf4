"""Review: the library (what a reviewer sees, how decisions are appended) and the HTTP app's guarantees
(CSRF, POST-only changes, only catalog images served, token beyond loopback)."""

from __future__ import annotations

import asyncio
import json
import re
import socket

import pytest
from click.testing import CliRunner

from flywheel import review
from flywheel.errors import CatalogError, ReviewError

BASE = "http://127.0.0.1:8765"


def _reviews(project) -> list[tuple]:
    rows = project.catalog.query("SELECT image_id, decision, reviewer, reason FROM reviews ORDER BY id")
    return [tuple(r) for r in rows]


def _verdicts(project) -> list[tuple]:
    return [tuple(r) for r in project.catalog.query("SELECT * FROM verdicts ORDER BY id")]


# --- library ---------------------------------------------------------------------------------------
def test_items_show_each_edit_with_its_source_scores_verdict_caption_and_recipe(review_project):
    project, ids = review_project
    project.catalog.insert("scores", {"image_id": ids["forest0"], "criterion": "identity",
                                      "scorer": "face:dlib_resnet_v1", "value": 0.29})  # a re-judge appends
    items = {i.id: i for i in review.list_items(project)}

    # Sources are never listed (they are always in the dataset); oldest round first.
    assert list(items) == [ids[n] for n in ("forest0", "sunset0", "forest1", "sunset2", "synth1")]
    forest = items[ids["forest0"]]
    assert [(p.id, p.role, p.kind) for p in forest.parents] == [(ids["src0"], "source", "source")]
    assert forest.recipe == "forest" and forest.caption == "fw_test in a forest"
    assert (forest.verdict, forest.verdict_reason) == ("accepted", "identity kept; forest edit accepted")
    assert [(s.criterion, s.value, s.note) for s in forest.scores] == [
        ("identity", 0.29, None), ("edit_applied", 0.42, None)]  # newest identity score only, identity first
    assert items[ids["sunset2"]].verdict is None
    synth = items[ids["synth1"]]
    assert (synth.kind, synth.round, synth.recipe, synth.prompt) == ("synthetic", 1, None, "fw_test on a beach")


def test_recipe_is_read_from_either_key_and_scorer_reasons_are_shown(review_project):
    project, ids = review_project
    project.catalog.execute("""UPDATE operations SET params_json = '{"recipe_id": "legacy"}'
                               WHERE id = (SELECT operation_id FROM images WHERE id = ?)""", (ids["sunset2"],))
    project.catalog.insert("scores", {"image_id": ids["sunset2"], "criterion": "same_character",
                                      "scorer": "vlm_verdict:tiny", "value": 1.0,
                                      "details_json": '{"reasons": "same face and hair", "raw": "..."}'})
    [item] = review.list_items(project, review.Filters(recipe="legacy"))
    assert item.id == ids["sunset2"] and item.recipe == "legacy"
    assert ("same_character", "same face and hair") in [(s.criterion, s.note) for s in item.scores]
    assert review.filter_options(project)["recipes"] == ["forest", "legacy", "sunset"]


@pytest.mark.parametrize("query, names", [
    ({"round": "1"}, ["synth1"]),
    ({"kind": "enriched", "recipe": "sunset"}, ["sunset0", "sunset2"]),
    ({"verdict": "needs_review"}, ["sunset0", "synth1"]),
    ({"verdict": "none"}, ["sunset2"]),
    ({"verdict": "rejected", "round": "0"}, ["forest1"]),
])
def test_filters_select_by_round_kind_verdict_and_recipe(review_project, query, names):
    project, ids = review_project
    query = {"verdict": "", "review": "", **query}  # empty = any; an absent key takes the default view
    assert [i.id for i in review.list_items(project, review.Filters.parse(query))] == [ids[n] for n in names]


@pytest.mark.parametrize("query", [{"kind": "source"}, {"round": "abc"}, {"round": "²"}, {"verdict": "maybe"},
                                   {"review": "done"}, {"limit": "-1"}])
def test_bad_filter_values_are_refused_with_the_allowed_ones(query):
    with pytest.raises(ReviewError):
        review.Filters.parse(query)


def test_reviews_are_appended_newest_wins_and_verdicts_stay(review_project):
    project, ids = review_project
    verdicts = _verdicts(project)
    a, b = ids["forest0"], ids["sunset0"]

    review.record_review(project, [a], "rejected", "ann", reason="hands look wrong")
    review.record_review(project, [a, b, a], "accepted", "ann")  # bulk; a duplicate id counts once
    review.record_review(project, [b], "cleared", "bob", reason="undo")  # undo: undecided again

    assert _reviews(project) == [(a, "rejected", "ann", "hands look wrong"), (a, "accepted", "ann", None),
                                 (b, "accepted", "ann", None), (b, "cleared", "bob", "undo")]
    assert _verdicts(project) == verdicts  # a human decision never overwrites a machine verdict
    items = {i.id: i for i in review.list_items(project)}
    assert items[a].review == "accepted" and items[a].reviewer == "ann" and items[b].review == "cleared"
    assert review.count_items(project).to_json() == {"total": 5, "accepted": 1, "rejected": 0, "skipped": 0,
                                                     "matching": 5, "remaining": 4}
    todo = review.list_items(project, review.Filters.parse({"review": "todo", "verdict": ""}))
    assert a not in [i.id for i in todo] and b in [i.id for i in todo]
    review.record_review(project, [b], "skipped", "bob")
    assert review.count_items(project).remaining == 4  # skipped still waits for a decision


@pytest.mark.parametrize("ids, decision, reviewer, message", [
    (["forest0", 999_999], "accepted", "ann", "no image with id 999999"),
    (["forest0"], "approve", "ann", "unknown decision"),
    (["forest0"], "accepted", "  ", "reviewer"),
    ([], "accepted", "ann", "no images"),
    ([True], "accepted", "ann", "not an image id"),
    (["1 OR 1=1"], "accepted", "ann", "not an image id"),
])
def test_bad_reviews_write_nothing(review_project, ids, decision, reviewer, message):
    project, named = review_project
    image_ids = [named.get(i, i) if isinstance(i, str) else i for i in ids]
    with pytest.raises(ReviewError, match=message):
        review.record_review(project, image_ids, decision, reviewer)
    assert _reviews(project) == []  # a bulk decision is all or nothing


def test_thumbnails_are_small_and_cached_on_disk(review_project):
    from PIL import Image

    project, ids = review_project
    sha = review.image_sha(project, ids["forest0"])
    path = review.thumbnail(project, sha)
    assert path.parent.parent == project.workspace / "cache" / "thumbs"
    with Image.open(path) as im:
        assert max(im.size) == review.THUMB_SIZE
    stamp = path.stat().st_mtime_ns
    assert review.thumbnail(project, sha) == path and path.stat().st_mtime_ns == stamp  # served from the cache
    with pytest.raises(CatalogError):  # the store refuses any name that is not a content hash
        review.thumbnail(project, "../../catalog")
    assert review.image_sha(project, 2**70) is None and review.image_sha(project, 0) is None


# --- HTTP ------------------------------------------------------------------------------------------
@pytest.fixture
def client(review_project):
    from starlette.testclient import TestClient

    from flywheel.web import create_app

    project, ids = review_project
    app = create_app(project.root, reviewer="tester")
    with TestClient(app, base_url=BASE, follow_redirects=False) as c:
        c.csrf = app.state.csrf
        yield c, app, project, ids


def _post(c, ids, decision, csrf=None, **headers):
    if csrf:
        headers["X-CSRF-Token"] = csrf
    return c.post("/review", json={"image_ids": ids, "decision": decision}, headers=headers)


def test_page_shows_items_escapes_model_text_and_embeds_the_csrf_secret(client):
    c, app, project, ids = client
    project.catalog.insert("captions", {"image_id": ids["forest0"], "text": "<script>alert(1)</script>",
                                        "source": "vlm"})
    page = c.get("/?verdict=&review=")
    assert page.status_code == 200
    assert f'data-id="{ids["forest0"]}"' in page.text and f'/image/{ids["src0"]}/thumb' in page.text
    assert "<script>alert(1)" not in page.text and "&lt;script&gt;alert(1)" in page.text
    assert f'<meta name="csrf-token" content="{app.state.csrf}">' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert c.get("/?kind=source").status_code == 400
    data = c.get("/api/items", params={"verdict": "none"}).json()
    assert [i["id"] for i in data["items"]] == [ids["sunset2"]] and data["counts"]["total"] == 1


def test_post_review_needs_the_csrf_secret_and_the_same_origin(client):
    c, app, project, ids = client
    a = ids["forest0"]
    assert _post(c, [a], "accepted").status_code == 403  # no secret
    assert _post(c, [a], "accepted", csrf="guess").status_code == 403
    assert _post(c, [a], "accepted", csrf=c.csrf, Origin="http://evil.example").status_code == 403
    assert _post(c, [a], "accepted", csrf=c.csrf, **{"Sec-Fetch-Site": "cross-site"}).status_code == 403
    form = c.post("/review", data={"image_id": str(a), "decision": "accepted"})  # a form without csrf_token
    assert form.status_code == 403
    assert _reviews(project) == []

    ok = _post(c, [a], "accepted", csrf=c.csrf, Origin=BASE)
    assert ok.status_code == 200 and ok.json()["recorded"] == 1
    bad = _post(c, [a, 424242], "rejected", csrf=c.csrf)
    assert bad.status_code == 400 and "424242" in bad.json()["error"]
    form = c.post("/review", data={"image_id": [str(a), str(ids["sunset0"])], "decision": "rejected",
                                   "csrf_token": c.csrf, "next": "/?kind=enriched"})
    assert form.status_code == 303 and form.headers["location"] == "/?kind=enriched"
    evil = c.post("/review", data={"image_id": str(a), "decision": "skipped", "csrf_token": c.csrf,
                                   "next": "//evil.example/"})
    assert evil.headers["location"] == "/"  # never an open redirect
    assert _reviews(project) == [(a, "accepted", "tester", None), (a, "rejected", "tester", None),
                                 (ids["sunset0"], "rejected", "tester", None), (a, "skipped", "tester", None)]


def test_oversized_and_unknown_bodies_are_refused(client):
    c, app, project, ids = client
    huge = c.post("/review", content=b'{"image_ids": [' + b"6, " * 400_000 + b'6], "decision": "accepted"}',
                  headers={"Content-Type": "application/json", "X-CSRF-Token": c.csrf})
    assert huge.status_code == 413
    text = c.post("/review", content=b"image_id=6&decision=accepted", headers={"Content-Type": "text/plain",
                                                                                "X-CSRF-Token": c.csrf})
    assert text.status_code == 415
    not_json = c.post("/review", content=b"{oops", headers={"Content-Type": "application/json", "X-CSRF-Token": c.csrf})
    assert not_json.status_code == 400
    assert _reviews(project) == []


def test_get_requests_never_change_state(client):
    c, app, project, ids = client
    q = {"image_ids": ids["forest0"], "image_id": ids["forest0"], "decision": "accepted", "csrf_token": c.csrf}
    assert c.get("/review", params=q).status_code == 405
    for path in ("/", "/api/items", f"/image/{ids['forest0']}/thumb"):
        assert c.get(path, params=q).status_code in (200, 400)
    assert _reviews(project) == []


def _raw_get(app, path: str) -> tuple[int, bytes]:
    """Send ``path`` to the app exactly as written: an HTTP client would normalise '../' away first."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode("latin-1"), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"127.0.0.1:8765")], "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8765)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize("path", [
    "/image/../catalog.sqlite", "/image/../../.flywheel/catalog.sqlite/full", "/image/%2e%2e/full",
    "/image/..%2F..%2Fcatalog.sqlite/full", "/image/6/../../../flywheel.toml", "/image/abc/full",
    "/image/-1/full", "/image/0/full", "/image/999999/thumb", "/image/99999999999999999999999/full",
    "/image/6/original", "/static/../app.py", "/static/../../review.py", "/static/%2e%2e/app.py",
    "/static//etc/passwd", "/image/1e3/full", "/image/ 6/full",
])
def test_only_catalog_images_are_served(client, path):
    c, app, project, ids = client
    status, body = _raw_get(app, path)
    assert status in (400, 404), (path, status)  # 400: not an image id at all; 404: no such image
    assert b"SQLite format" not in body and b"import" not in body and b"root:" not in body
    error = json.loads(body)  # a one-line JSON error, never a file
    assert set(error) == {"error", "hint"} and "\n" not in error["error"]


def test_images_are_served_by_catalog_id(client):
    c, app, project, ids = client
    for name in ("forest0", "src0"):
        sha = review.image_sha(project, ids[name])
        full = c.get(f"/image/{ids[name]}/full")
        assert full.status_code == 200 and full.content == project.store.image_path(sha).read_bytes()
        thumb = c.get(f"/image/{ids[name]}/thumb")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"


def test_without_a_token_only_loopback_hosts_are_answered(client):
    c, app, project, ids = client
    assert c.get("/", headers={"Host": "evil.example:8765"}).status_code == 400  # DNS rebinding
    assert c.get("/", headers={"Host": "localhost:8765"}).status_code == 200


def test_a_token_guards_every_request(review_project):
    from starlette.testclient import TestClient

    from flywheel.web import create_app

    project, ids = review_project
    token = "s3cret-token-for-tests-only"
    app = create_app(project.root, token=token, reviewer="tester")
    with TestClient(app, base_url="http://192.0.2.10:8765", follow_redirects=False) as c:
        assert c.get("/").status_code == 401
        assert c.get(f"/image/{ids['forest0']}/full").status_code == 401
        assert c.get("/", params={"token": "wrong"}).status_code == 401
        assert _post(c, [ids["forest0"]], "accepted", csrf=app.state.csrf).status_code == 401
        login = c.get("/", params={"token": token, "kind": "enriched"})
        assert login.status_code == 303 and login.headers["location"] == "/?kind=enriched"  # token leaves the URL
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert c.get("/").status_code == 200  # the cookie now carries it
        assert _post(c, [ids["forest0"]], "accepted", csrf=app.state.csrf).status_code == 200
    assert _reviews(project) == [(ids["forest0"], "accepted", "tester", None)]


@pytest.mark.parametrize("host, token, ok", [
    ("127.0.0.1", None, True), ("localhost", None, True), ("::1", None, True), ("127.0.0.2", None, True),
    ("0.0.0.0", None, False), ("192.168.1.5", None, False), ("0.0.0.0", "short", False),
    ("0.0.0.0", "a-long-enough-random-token", True),
])
def test_beyond_loopback_needs_a_strong_token(host, token, ok):
    from flywheel.web.security import check_bind

    if ok:
        check_bind(host, token)
    else:
        with pytest.raises(ReviewError, match="token"):
            check_bind(host, token)


def test_cli_refuses_a_public_host_without_a_token(review_project):
    from flywheel.cli import main

    project, _ = review_project
    res = CliRunner().invoke(main, ["-C", str(project.root), "review", "--host", "0.0.0.0", "--no-browser"],
                             env={"FLYWHEEL_REVIEW_TOKEN": None})
    assert res.exit_code == 1
    assert "refusing to serve the review app on 0.0.0.0 without a token" in res.output
    assert "Hint:" in res.output and "Traceback" not in res.output


def test_a_busy_port_is_a_clear_error(review_project):
    from flywheel.web import serve

    project, _ = review_project
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ReviewError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve(project.root, port=port, open_browser=False)



def test_held_out_evaluation_images_are_not_in_the_review_queue(review_project):
    from flywheel.review import Filters, count_items, list_items

    project, ids = review_project
    before = count_items(project, Filters())
    listed = [item.id for item in list_items(project, Filters())]
    held_out = listed[0]
    project.catalog.execute("UPDATE images SET purpose = 'eval' WHERE id = ?", (held_out,))
    assert held_out not in [item.id for item in list_items(project, Filters())]
    assert count_items(project, Filters()).total == before.total - 1


# --- what the page opens on, and scores a reviewer can read -------------------------------------------
def test_the_bare_page_shows_what_needs_a_human_not_what_the_judge_accepted(client):
    c, app, project, ids = client
    assert review.Filters.parse({}) == review.Filters(verdict="needs_review", review="todo")
    assert review.Filters.parse({"verdict": "", "review": ""}) == review.Filters()  # empty: any
    page = c.get("/")
    shown = [int(i) for i in re.findall(r'<article class="card[^"]*" id="item-(\d+)"', page.text)]
    assert shown == [ids["sunset0"], ids["synth1"]]  # the judge's needs_review; accepted forest0 is not "to review"
    assert '<b data-count="remaining">2</b> to review' in page.text
    assert ">1 accepted</a>" in page.text and ">2 need review</a>" in page.text  # the judge's tally, as links
    review.record_review(project, [ids["sunset0"]], "accepted", "ann")
    assert [i["id"] for i in c.get("/api/items").json()["items"]] == [ids["synth1"]]
    # Links keep an explicit "any": paging never falls back to the default view.
    assert review.Filters(round=1).query() == {"round": "1", "verdict": "", "review": ""}


def test_scores_read_as_labels_with_their_thresholds(review_project):
    from flywheel.config import JudgeConfig
    from flywheel.review.labels import score_label

    cfg = JudgeConfig()

    def label(criterion, scorer, value, **details):
        got = score_label(criterion, scorer, value, details, cfg)
        return got.text, got.status

    assert label("identity", "face:dlib_resnet_v1", 0.42, max_distance=0.6) == (
        "identity: face distance 0.42 (accept ≤ 0.60)", "pass")
    assert label("identity", "face:dlib_resnet_v1", 0.71, max_distance=0.6, closest_source_id=3) == (
        "identity: face distance 0.71 to source #3 (accept ≤ 0.60)", "fail")
    assert label("identity", "face:dlib_resnet_v1", None, note="no face found in the image") == (
        "identity: no face found in the image", "unknown")
    assert label("duplicate", "phash:dct64", 3, nearest_image_id=12, max_distance=6) == (
        "near-duplicate of #12? (phash distance 3, limit 6)", "unknown")
    assert label("duplicate", "phash:dct64", 28, nearest_image_id=12, max_distance=6) == (
        "not a near-duplicate: closest #12 at phash distance 28 (limit 6)", "pass")
    assert label("duplicate", "pixels:change", 0.012, image_id=12, phash_distance=3, max=0.05) == (
        "near-duplicate of #12 (phash distance 3, limit 6; 1.2% of pixels differ, duplicate < 5%)", "fail")
    assert label("edit_applied", "pixels:change", 0.34, min=0.05) == (
        "edit: 34% of pixels changed (accept ≥ 5%)", "pass")
    assert label("quality", "pixels:sharpness", 0.0002, min=0.0005) == (
        "quality: sharpness 0.0002 (accept ≥ 0.0005)", "fail")
    assert label("quality", "pixels:noise", 0.012, max=0.04) == ("quality: noise σ 0.012 (accept ≤ 0.040)", "pass")
    assert label("identity", "vlm_pairwise:tiny", 0.83) == ("identity: P(same character) 0.83 (accept ≥ 0.50)", "pass")
    assert label("quality", "vlm_verdict:tiny", 0.0, reasons="extra fingers") == (
        'VLM verdict: artifacts ("extra fingers")', "fail")
    assert label("aesthetics", "someone:else", 0.5) == ("aesthetics: 0.5", "info")
    assert label("edit_applied", "mask:mediapipe_selfie", 0.91, ok=False,
                 problem="covers 91% of the frame (> 85%): no person separable") == (
        "subject mask failed: covers 91% of the frame (> 85%): no person separable", "fail")
    assert label("edit_applied", "mask:mediapipe_selfie", 0.52, ok=True) == (
        "subject mask: covers 52% of the frame (usable)", "pass")
    # On the page: the label, with the raw scorer name kept as a tooltip.
    project, ids = review_project
    [item] = review.list_items(project, review.Filters(verdict="accepted"))
    assert [(s.label, s.status) for s in item.scores if s.scorer == "face:dlib_resnet_v1"] == [
        ("identity: face distance 0.31 (accept ≤ 0.60)", "pass")]


# --- acting on a whole filter --------------------------------------------------------------------------
def test_a_filter_action_writes_one_row_per_image_of_every_page(client):
    c, app, project, ids = client
    verdicts = _verdicts(project)
    body = {"filter": {"kind": "enriched", "verdict": "", "review": "todo", "limit": "1"}, "expected": 4,
            "decision": "accepted"}
    res = c.post("/review", json=body, headers={"X-CSRF-Token": c.csrf})
    assert res.status_code == 200, res.text
    enriched = [ids[n] for n in ("forest0", "sunset0", "forest1", "sunset2")]
    assert res.json()["recorded"] == 4 and res.json()["previous"] == {str(i): None for i in enriched}
    assert _reviews(project) == [(i, "accepted", "tester", None) for i in enriched]  # limit=1 did not cut it short
    assert _verdicts(project) == verdicts
    # Confirmed for 4, but the filter now selects none (all decided): nothing is written.
    stale = c.post("/review", json=body, headers={"X-CSRF-Token": c.csrf})
    assert stale.status_code == 409
    assert stale.json()["error"] == "this filter now selects 0 images, not the 4 you confirmed"
    with pytest.raises(review.SelectionChanged):
        review.record_filter_review(project, review.Filters(kind="synthetic"), "rejected", "ann", expected=5)
    assert len(_reviews(project)) == 4


# --- absurd input gets a one-line JSON 4xx, never a 500 --------------------------------------------------
def _json_4xx(res) -> str:
    assert 400 <= res.status_code < 500, (res.status_code, res.text[:200])
    body = res.json()
    assert set(body) == {"error", "hint"} and "\n" not in body["error"] and len(body["error"]) < 200
    return body["error"]


@pytest.mark.parametrize("image_id", ["9" * 5000, "-3", "1.5", "1e3", "abc", "0x10", "١٢", "0", "%00"])
def test_absurd_image_ids_get_a_json_4xx(client, image_id):
    c, app, project, ids = client
    for kind in ("full", "thumb"):
        _json_4xx(c.get(f"/image/{image_id}/{kind}"))
    for value in (image_id, [image_id]):
        _json_4xx(c.post("/review", json={"image_ids": value, "decision": "accepted"}, headers={"X-CSRF-Token": c.csrf}))
    _json_4xx(c.post("/caption", json={"image_id": image_id, "text": "fw_test"}, headers={"X-CSRF-Token": c.csrf}))
    _json_4xx(c.get("/", params={"source": image_id}))
    assert _reviews(project) == []


@pytest.mark.parametrize("raw", [
    b'{"image_ids": [' + b"9" * 5000 + b'], "decision": "accepted"}',  # past int()'s digit limit
    b'{"image_ids": [-3, 1.5, 1e999], "decision": "accepted"}',
    b'{"image_ids": ' + b"[" * 100_000 + b"]" * 100_000 + b', "decision": "accepted"}',
    b"[" * 300_000,
    b'{"filter": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b', "expected": 1, "decision": "accepted"}',
    b'{"image_ids": [[[[6]]]], "decision": {"a": []}}',
    b'{"filter": {"verdict": ["needs_review"]}, "expected": 1, "decision": "accepted"}',
    b'{"filter": {}, "expected": true, "decision": "accepted"}',
    b'{"image_id": [6], "text": {"deep": [[["x"]]]}}',
])
def test_deep_and_malformed_bodies_get_a_json_4xx(client, raw):
    c, app, project, ids = client
    captions_before = project.catalog.query("SELECT COUNT(*) FROM captions")[0][0]
    for route in ("/review", "/caption"):
        _json_4xx(c.post(route, content=raw, headers={"Content-Type": "application/json", "X-CSRF-Token": c.csrf}))
    assert _reviews(project) == []
    assert project.catalog.query("SELECT COUNT(*) FROM captions")[0][0] == captions_before


def test_unknown_routes_and_methods_answer_json(client):
    c, app, project, ids = client
    assert _json_4xx(c.get("/nope")) == "not found: no such page or image"
    assert _json_4xx(c.get("/static/nope.js")) == "not found: no such page or image"
    assert _json_4xx(c.get("/caption")) == "GET is not allowed here"


# --- captions from the page ------------------------------------------------------------------------
def test_caption_route_appends_a_human_caption(client):
    c, app, project, ids = client
    a = ids["forest0"]
    assert c.post("/caption", json={"image_id": a, "text": "x"}).status_code == 403  # CSRF as for reviews
    res = c.post("/caption", json={"image_id": a, "text": "under pines\u202e\nat dawn"}, headers={"X-CSRF-Token": c.csrf})
    assert res.status_code == 200, res.text
    assert res.json()["caption"] == "fw_test, under pines at dawn" and res.json()["changed"]
    assert "added the trigger word 'fw_test' at the start" in res.json()["notes"]
    assert _json_4xx(c.post("/caption", json={"image_id": a, "text": " \u200b "},
                            headers={"X-CSRF-Token": c.csrf})) == "the caption is empty after cleaning"
    form = c.post("/caption", data={"image_id": str(a), "text": "fw_test by a lake", "csrf_token": c.csrf,
                                    "next": "/?kind=enriched"})
    assert form.status_code == 303 and form.headers["location"] == "/?kind=enriched"
    rows = project.catalog.query("SELECT source, text FROM captions WHERE image_id = ? ORDER BY id", (a,))
    assert [tuple(r) for r in rows] == [("template", "fw_test in a forest"), ("human", "fw_test, under pines at dawn"),
                                        ("human", "fw_test by a lake")]
    [item] = [i for i in c.get("/api/items", params={"verdict": "accepted"}).json()["items"]]
    assert (item["caption"], item["caption_source"]) == ("fw_test by a lake", "human")
