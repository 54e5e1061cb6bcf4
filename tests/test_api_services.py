"""[api]: caption, judge and enrich through an OpenAI-compatible service, over real HTTP on loopback with the
real ``openai`` client (``flywheel.testing.openai_server``): catalog rows per call, the upload notice, retries
on 429 (Retry-After) and 500, timeouts, malformed JSON and refusals, resuming, and the key kept out of
the catalog, the logs and the errors."""

from __future__ import annotations

import json
import logging
import re

import pytest
from click.testing import CliRunner
from PIL import Image

from flywheel.cli import main

pytest.importorskip("openai")

KEY = "sk-fwtest-7Hq2LmZ9xV4pR8sTq1"
ENV = "FLYWHEEL_TEST_API_KEY"
RECIPES = ["forest", "beach", "sunset"]


@pytest.fixture
def service(monkeypatch):
    from flywheel.testing.openai_server import FakeOpenAI

    monkeypatch.setenv(ENV, KEY)
    with FakeOpenAI(key=KEY) as server:
        yield server


def _configure(project, server, **api) -> None:
    """Every role on the service; one step per image in caption and judge, so a failure stops at one image."""
    from flywheel.sample import astronaut

    settings = {"base_url": server.base_url, "api_key_env": ENV, "timeout_s": 5.0, "max_retries": 2,
                "concurrency": 2, "cost_per_1k_input_tokens": 1.0, "cost_per_1k_output_tokens": 2.0,
                "cost_per_image": 0.04, **api}
    toml = project.root / "flywheel.toml"
    text = toml.read_text(encoding="utf-8")
    text = text.replace("\n[models]\n", '\n[models]\ncaptioner = "api:test-vlm"\njudge = "api:test-vlm"\n'
                        'editor = "api:test-edit"\n', 1)
    start = text.index("\nrecipes = [", text.index("[enrich]"))
    text = text[:start] + f'\nbackend = "api"\nrecipes = {json.dumps(RECIPES)}' + text[text.index("\n", start + 1):]
    for section in ("[caption]", "[judge]"):
        at = text.index("\nbatch_size = 16\n", text.index(section))
        text = text[:at] + "\nbatch_size = 1\n" + text[at + len("\nbatch_size = 16\n"):]
    text = text.replace("\n[api]\n", "\n[api]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    toml.write_text(text, encoding="utf-8")
    project.close()
    folder = project.root.parent / "in"
    folder.mkdir()
    astronaut().resize((256, 256), Image.Resampling.LANCZOS).save(folder / "hero.png")
    _run(project, "ingest", str(folder))


def _run(project, *args: str, ok: bool = True) -> str:
    r = CliRunner().invoke(main, ["-C", str(project.root), *args])
    assert "Traceback" not in r.output, r.output
    assert (r.exit_code == 0) == ok, r.output
    return r.output


def _query(project, sql: str, params: tuple = ()):
    from flywheel.project import open_project

    with open_project(project.root) as p:
        return [dict(r) for r in p.catalog.query(sql, params)]


def _api_rows(project, api: str):
    rows = _query(project, "SELECT * FROM operations WHERE json_extract(params_json, '$.action') = 'api_call' "
                           "AND json_extract(params_json, '$.api') = ? ORDER BY id", (api,))
    return [{**r, "params": json.loads(r["params_json"])} for r in rows]


def _assert_no_key(project, *texts: str) -> None:
    for path in (project.root / ".flywheel").glob("catalog.sqlite*"):  # the database, its WAL and shared memory
        assert KEY.encode() not in path.read_bytes(), path
    for text in texts:
        assert KEY not in text and KEY[:12] not in text


@pytest.mark.slow  # three stages through the CLI; most of the time is the judge's pixel signals
def test_enrich_caption_and_judge_run_through_the_service_with_a_row_per_call(project, service, caplog):
    caplog.set_level(logging.DEBUG)  # the openai and HTTP libraries' debug logging too: the key must not be there
    _configure(project, service)

    out = _run(project, "enrich", "--backend", "api")
    notice = f"images will be sent to {service.base_url}"
    assert notice in out and "enrich (api): 3 edits planned; 3 new" in out
    edits = _api_rows(project, "images.edit")
    assert len(edits) == 3 and {e["status"] for e in edits} == {"ok"}
    e = edits[0]["params"]
    assert e["endpoint"] == service.base_url and e["model"] == "test-edit" and e["images"] == 1
    assert e["usage"] == {"input_tokens": 50, "output_tokens": 200, "total_tokens": 250}
    assert e["estimated_cost_usd"] == pytest.approx(0.04 + 50 / 1000 * 1.0 + 200 / 1000 * 2.0)
    # Each call row hangs under the unit it made, and the image is the service's (here: a tint of the source).
    units = _query(project, "SELECT o.id, o.params_json, i.sha256 FROM operations o JOIN images i ON "
                            "i.operation_id = o.id WHERE o.stage = 'enrich' AND o.work_key IS NOT NULL ORDER BY o.id")
    assert len(units) == 3 and sorted(r["parent_id"] for r in edits) == [u["id"] for u in units]
    assert all(u["params_json"].count("api:test-edit") for u in units)

    service.fail("refuse", path="chat")  # the source's caption request: an unusable answer, so a template caption
    out = _run(project, "caption")
    assert notice not in out  # once per project and endpoint
    captions = _query(project, "SELECT text, source FROM captions ORDER BY image_id")
    assert [c["source"] for c in captions] == ["template", "vlm", "vlm", "vlm"]
    assert captions[1]["text"] == "fw_test, standing in a forest clearing, soft morning light, three-quarter view"
    chats = _api_rows(project, "chat.completions")
    assert len(chats) == 4 and all(c["params"]["usage"]["prompt_tokens"] == 120 for c in chats)
    assert chats[0]["params"]["refusal"] == "I can't help with judging this image." and chats[0]["status"] == "ok"
    assert chats[1]["params"]["estimated_cost_usd"] == pytest.approx(120 / 1000 + 8 / 1000 * 2.0)

    _run(project, "judge")
    verdicts = _query(project, "SELECT verdict, reason FROM verdicts")
    assert len(verdicts) == 3 and {v["verdict"] for v in verdicts} == {"accepted"}, verdicts
    pairwise = _query(project, "SELECT value, details_json FROM scores WHERE scorer = 'vlm_pairwise:api:test-vlm' "
                               "AND criterion = 'identity'")
    assert len(pairwise) == 3 and pairwise[0]["value"] == pytest.approx(0.91 / 0.99)  # "Yes" + "yes" against "No"
    assert json.loads(pairwise[0]["details_json"])["answer_from"] == "logprobs"
    verdict_scores = _query(project, "SELECT value, details_json FROM scores WHERE scorer = 'vlm_verdict:api:test-vlm'")
    assert verdict_scores and "same face, new background" in verdict_scores[0]["details_json"]
    # Requests carried the image as a data URL; the server saw the key in the header only.
    assert service.seen("chat") and all(s.status == 200 for s in service.requests)
    _assert_no_key(project, out, caplog.text)


@pytest.mark.slow  # the waits are the faults': Retry-After 1 s, backoff, timeouts
def test_faults_are_retried_or_recorded_and_a_rerun_redoes_only_what_failed(project, service, caplog):
    caplog.set_level(logging.DEBUG)
    # The timeout leaves room for a loaded machine: a spurious timeout would add a retry the test counts.
    _configure(project, service, max_retries=1, timeout_s=1.5)
    # enrich: forest gets 429 with Retry-After: 1 and is retried; beach is refused; sunset times out twice.
    service.fail("status", path="edits", when="forest", status=429, headers={"Retry-After": "1"})
    service.fail("refuse", path="edits", when="beach")
    service.fail("sleep", path="edits", when="sunset", seconds=2.0, times=2)
    out = _run(project, "enrich")
    assert "enrich (api): 3 edits planned; 1 new, 0 already done, 2 failed (re-run to retry)" in out
    forest = [s for s in service.seen("edits") if "forest" in s.prompt]
    assert [s.status for s in forest] == [429, 200] and forest[1].at - forest[0].at >= 0.95  # Retry-After
    failed = {json.loads(r["params_json"])["recipe"]: r["error"] for r in _query(
        project, "SELECT params_json, error FROM operations WHERE stage = 'enrich' AND status = 'failed' "
                 "AND work_key IS NOT NULL")}
    assert set(failed) == {"beach", "sunset"}
    assert "refused the request (content policy): Your request was rejected as a result of our safety system" \
        in failed["beach"]
    assert "no answer within 1.5 s (after 1 retry)" in failed["sunset"]
    calls = _api_rows(project, "images.edit")
    assert [c["status"] for c in calls] == ["ok", "failed", "failed"]
    assert calls[1]["params"]["refusal"].startswith("Your request was rejected")
    assert calls[0]["params"]["latency_s"] >= 1.0  # the retries' wait is part of the call

    before = len(service.seen("edits"))
    out = _run(project, "enrich")
    assert "3 edits planned; 2 new, 1 already done" in out
    redone = service.seen("edits")[before:]
    assert sorted(next(r for r in RECIPES if r in s.prompt) for s in redone) == ["beach", "sunset"]

    # caption: the first image's request gets a 500 and is retried; the second's fails twice: the stage stops
    # with one line and keeps the first caption; the re-run asks only for the other three.
    service.fail("status", path="chat", status=500)
    service.fail("status", path="chat", status=500, times=2, after=1)
    out = _run(project, "caption", ok=False)
    assert re.search(r"Error: api:test-vlm at http://127\.0\.0\.1:\d+/v1: HTTP 500 after 1 retry: injected", out)
    assert [s.status for s in service.seen("chat")] == [500, 200, 500, 500]
    assert len(_query(project, "SELECT id FROM captions")) == 1
    _run(project, "caption")
    assert len(_query(project, "SELECT id FROM captions")) == 4 and len(service.seen("chat")) == 4 + 3

    # judge: image 1's JSON verdict is malformed twice; image 2's verdict and identity question are refused;
    # image 3's first question times out: the stage stops; a re-run judges image 3 only.
    service.fail("text", path="chat", when="JSON object", text="Looks fine to me!", times=2)
    service.fail("refuse", path="chat", when="JSON object", times=2)
    service.fail("refuse", path="chat", when="same character", after=1)
    service.fail("sleep", path="chat", when="same character", seconds=2.0, times=2)
    out = _run(project, "judge", ok=False)
    assert "no answer within 1.5 s" in out
    verdicts = _query(project, "SELECT image_id, verdict, reason FROM verdicts ORDER BY image_id")
    assert [v["verdict"] for v in verdicts] == ["needs_review", "needs_review"], [v["reason"] for v in verdicts]
    assert "judge output unparseable (no JSON object with the verdict keys)" in verdicts[0]["reason"]
    assert "refused by the service: I can't help with judging this image." in verdicts[1]["reason"]
    refused = _query(project, "SELECT value, details_json FROM scores WHERE image_id = ? AND criterion = 'identity' "
                              "AND scorer LIKE 'vlm_pairwise:%'", (verdicts[1]["image_id"],))
    assert refused[0]["value"] is None
    assert json.loads(refused[0]["details_json"])["refusal"] == "I can't help with judging this image."
    raw = _query(project, "SELECT details_json FROM scores WHERE image_id = ? AND scorer LIKE 'vlm_verdict:%'",
                 (verdicts[0]["image_id"],))
    assert json.loads(raw[0]["details_json"])["raw"] == ["Looks fine to me!", "Looks fine to me!"]
    before = len(service.seen("chat"))
    _run(project, "judge")
    assert len(_query(project, "SELECT id FROM verdicts")) == 3
    asked = service.seen("chat")[before:]
    assert sum("same character" in s.prompt for s in asked) == 1  # only image 3's questions were asked again
    _assert_no_key(project, out, caplog.text)


def test_a_wrong_key_fails_in_one_line_without_the_key_and_a_missing_variable_is_named(project, service, monkeypatch,
                                                                                      caplog):
    caplog.set_level(logging.DEBUG)
    _configure(project, service)
    wrong = "sk-wrongkey-abcdef0123456789"
    monkeypatch.setenv(ENV, wrong)
    out = _run(project, "caption", ok=False)
    assert "HTTP 401: Incorrect API key provided: ***." in out and f"environment variable {ENV}" in out
    assert wrong not in out and wrong not in caplog.text  # the server echoed it back; it was scrubbed
    rows = _api_rows(project, "chat.completions")
    assert rows[0]["status"] == "failed" and wrong not in rows[0]["error"]
    monkeypatch.delenv(ENV)
    out = _run(project, "caption", ok=False)
    assert f"[api] api_key_env = '{ENV}', but that environment variable is not set" in out


def test_yes_no_answers_without_logprobs_are_read_from_the_text_and_say_so(service):
    from flywheel.config_api import ApiConfig
    from flywheel.models.base import ChatRequest
    from flywheel.models.openai_vlm import OpenAIVLM

    service.logprobs = False
    recorded = []
    cfg = ApiConfig(base_url=service.base_url, api_key_env=ENV, concurrency=1)  # in order: the 2nd gets the fault
    vlm = OpenAIVLM(cfg, "local-vl", recorder=recorded.append)
    image = Image.new("RGB", (32, 32), "red")
    service.fail("text", path="chat", text="Maybe.", after=1)
    probs = vlm.option_probabilities([ChatRequest("Same character? Answer yes or no.", [image, image])] * 2,
                                     ["yes", "no"])
    assert dict(probs[0]) == {"yes": 1.0, "no": 0.0}
    assert probs[0].provenance == {"answer_from": "answer text (the server gave no logprobs)"}
    assert dict(probs[1]) == {"yes": None, "no": None} and probs[1].provenance["unusable_answer"] == "Maybe."
    assert [r.answer_from for r in recorded] == ["answer text", "answer text"]


def test_the_generator_returns_an_image_of_the_asked_size_and_records_the_call(project, service):
    from flywheel.config_api import ApiConfig
    from flywheel.models.openai_images import load_api_generator

    cfg = ApiConfig(base_url=service.base_url, api_key_env=ENV, cost_per_image=0.08)
    gen = load_api_generator(cfg, catalog=project.catalog, stage="enrich")
    image = gen.generate("a portrait of fw_test in a forest", "96x64", seed=3)
    assert image.size == (96, 64) and image.getpixel((0, 0)) == (40, 120, 200)
    rows = project.catalog.query("SELECT model, params_json FROM operations WHERE "
                                 "json_extract(params_json, '$.api') = 'images.generate'")
    assert rows[0]["model"] == "api:dall-e-3" and json.loads(rows[0]["params_json"])["estimated_cost_usd"] == 0.08


def test_api_settings_reject_a_key_in_place_of_a_variable_name():
    from flywheel.config import parse_config
    from flywheel.errors import ConfigError

    with pytest.raises(ConfigError, match="api_key_env"):
        parse_config({"project": {"name": "x", "trigger": "fw_x"}, "api": {"api_key_env": KEY}}, "t")


def test_the_recorded_endpoint_drops_credentials_and_query_strings():
    from flywheel.models.openai_common import public_endpoint

    assert public_endpoint("https://user:pw@llm.example.com:8443/v1?api-key=abc#x") == "https://llm.example.com:8443/v1"
    assert public_endpoint("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


def test_models_info_on_a_service_says_it_is_one():
    r = CliRunner().invoke(main, ["models", "info", "api:gpt-4o-mini"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "Error: 'api:gpt-4o-mini' is a service, not a model on this machine" in r.output and "[api]" in r.output
