"""The task page in headless Chromium (Debian's, driven by Playwright): keyboard answers, an undo, a reload
that keeps the answers, the CSV download, and that download aggregated to the exact expected result."""

from __future__ import annotations

from pathlib import Path

import pytest

from knn_diffusion.human_eval.aggregate import aggregate
from knn_diffusion.human_eval.package import make_pairs, read_system, write_package
from tests.human_eval_helpers import write_systems

CHROMIUM = "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="Debian chromium is not installed")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture
def study(tmp_path):
    a, b = (read_system(p) for p in write_systems(tmp_path / "systems"))
    key = write_package(make_pairs(a, b, 600, seed=0), tmp_path / "package", tmp_path / "key.json", a=a, b=b,
                        name_a="knn", name_b="retrieval_baseline", questions=["quality", "alignment"], raters=1)
    return key, tmp_path / "package"


@pytest.fixture
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1100, "height": 720}, accept_downloads=True)
        yield context.new_page()
        browser.close()


def test_rater_answers_with_keys_undo_reload_download_and_aggregate(study, page, tmp_path):
    key, folder = study
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto((folder / "alignment.html").as_uri())
    assert page.inner_text("h1") == "Which image best matches the text?"
    assert page.inner_text("#prompt") == f"\u201c{key['pairs'][0]['prompt']}\u201d"
    page.keyboard.press("ArrowLeft")  # no rater id yet: refused
    assert "Enter your rater id first" in page.inner_text("#status")
    page.fill("#rater", "alice")
    page.press("#rater", "Enter")
    for press in ("ArrowLeft", "ArrowRight", "ArrowLeft", "Backspace", "ArrowRight"):  # the 3rd answer undone
        page.keyboard.press(press)
    assert page.inner_text("#progress").strip() == "3 / 6 answered"
    assert page.inner_text("#prompt") == f"\u201c{key['pairs'][3]['prompt']}\u201d"
    page.screenshot(path=str(tmp_path / "task_screen.png"))

    # Answers live in localStorage until downloaded. Chromium writes it to its storage service
    # asynchronously, so a reload a few milliseconds after the last key could read the store before the
    # write lands (seen once in CI). A second tab on the page, as a rater might open, waits until the
    # answers are there, and stays open across the reload so the store is not released in between.
    second = page.context.new_page()
    second.goto((folder / "alignment.html").as_uri())
    second.wait_for_function("key => (JSON.parse(localStorage.getItem(key)) || {answers: []}).answers.length === 3",
                             arg=f"knn-diffusion-human-eval:{key['package_id']}:alignment", timeout=10_000)
    page.reload()
    second.close()
    assert page.inner_text("#progress").strip() == "3 / 6 answered"
    assert page.input_value("#rater") == "alice"
    for press in ("ArrowLeft", "ArrowLeft", "ArrowRight"):
        page.keyboard.press(press)
    assert page.is_visible("#done") and not page.is_visible("#pair")

    with page.expect_download() as download:
        page.click("#download")
    results = tmp_path / "results"
    results.mkdir()
    download.value.save_as(results / download.value.suggested_filename)
    assert download.value.suggested_filename == "human-eval-alignment-alice.csv"
    assert all(url.startswith(("file:", "blob:", "data:")) for url in requests), requests

    chosen = ["left", "right", "right", "left", "left", "right"]
    lines = (results / "human-eval-alignment-alice.csv").read_text().splitlines()
    assert lines[0] == "package_id,question,pair_id,rater_id,choice,answered_at"
    assert [line.split(",")[4] for line in lines[1:]] == chosen
    report = aggregate(results, key)
    result = report.results["alignment"]
    wins_a = sum(side == pair["a_side"] for side, pair in zip(chosen, key["pairs"]))
    assert [p["a_side"] for p in key["pairs"]] == ["right", "right", "left", "left", "left", "right"]  # seed 0
    assert (result.wins_a, result.wins_b, result.answers) == (wins_a, 6 - wins_a, 6) == (4, 2, 6)
    assert result.pct_prefer_a == pytest.approx(400 / 6)
    assert report.results["quality"] is None


def test_quality_page_hides_the_prompt_and_buttons_answer_too(study, page):
    _, folder = study
    page.goto((folder / "quality.html").as_uri() + "?rater=bob")
    assert page.input_value("#rater") == "bob" and not page.is_visible("#prompt")
    page.click("#right")
    page.click("#undo")
    page.click("#left")
    assert page.inner_text("#progress").strip() == "1 / 6 answered"
    assert page.evaluate("Object.keys(localStorage)")[0].startswith("knn-diffusion-human-eval:")
