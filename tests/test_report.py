"""report.html in a real headless browser: Debian's Chromium driven by Selenium.

CI installs ``chromium`` and ``chromium-driver`` (.ci/run); without them this test fails
rather than skips.  Set ``CAMCORE_REPORT_SCREENSHOT=docs/report.png`` to keep the
screenshot for the README.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camcore import InvalidInput
from camcore.report import render_report, report_data, write_report

CHROMIUM = os.environ.get("CAMCORE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CAMCORE_CHROMEDRIVER", "/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        assert shutil.which(path), f"{path} is missing: apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _open(driver, path):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(Path(path).resolve().as_uri())
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.ready") == "1")


def _choose(driver, select_id, value):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, select_id)).select_by_value(value)


def _cards(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#grid .card")


def _scores(driver):
    return driver.execute_script(
        "return [...document.querySelectorAll('#grid .card .score')].map(e => parseFloat(e.dataset.score))")


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    """`camcore explain` of six photos (top 2 classes) and a corrupt file, with the embedded model."""
    from skimage import data

    from camcore.cli import main

    root = tmp_path_factory.mktemp("run")
    photos = root / "photos"
    photos.mkdir()
    for name in ("chelsea", "coffee", "rocket", "astronaut", "cat", "hubble_deep_field"):
        Image.fromarray(getattr(data, name)()).save(photos / f"{name}.jpg", quality=92)
    (photos / "broken.jpg").write_bytes(b"not a picture")
    here = os.getcwd()
    os.chdir(root)  # relative paths, as a user types them (and as the screenshot shows them)
    try:
        status = main(["explain", "photos", "--out", "out", "--top-k", "2", "--quiet", "--workers", "0"])
    finally:
        os.chdir(here)
    assert status == 1  # the corrupt file is reported, the others explained
    return root / "out"


def test_report_in_headless_chromium(browser, explained):
    from selenium.webdriver.common.by import By

    page = write_report(explained)
    assert page == explained / "report.html"
    records = json.loads((explained / "results.json").read_text())["images"]
    _open(browser, page)
    cards = _cards(browser)
    assert len(cards) == len(records) == 7  # one card per image
    assert browser.find_element(By.ID, "range").text == "1\u20137 of 7"
    loaded = browser.execute_script(
        "return [...document.querySelectorAll('#grid img.thumb')].map(i => i.complete && i.naturalWidth > 0)")
    assert loaded == [True] * 6  # the overlays beside the page, by relative path
    assert "errors 1" in browser.find_element(By.ID, "summary").text

    # filter to a class: exactly the images that have it
    top = records[0]["classes"][0]
    _choose(browser, "class", str(top["index"]))
    want = [r for r in records if any(c["index"] == top["index"] for c in r["classes"])]
    assert len(_cards(browser)) == len(want) >= 1
    assert all(top["name"] in c.text for c in _cards(browser))

    # errors only
    _choose(browser, "class", "")
    _choose(browser, "status", "error")
    [card] = _cards(browser)
    assert "broken.jpg" in card.text

    # sort by score, high first, then low first
    _choose(browser, "status", "all")
    _choose(browser, "sort", "score-desc")
    scores = _scores(browser)
    assert scores == sorted(scores, reverse=True) and len(scores) == 6
    assert scores[0] == pytest.approx(max(r["classes"][0]["score"] for r in records if r["classes"]), abs=1e-6)
    _choose(browser, "sort", "score-asc")
    assert _scores(browser) == sorted(scores)
    _choose(browser, "sort", "score-desc")

    # a card opens the image at full size with its classes and boxes
    _cards(browser)[0].click()
    detail = browser.find_element(By.ID, "detail")
    assert "open" in detail.get_attribute("class")
    rows = detail.find_elements(By.CSS_SELECTOR, "table tr")
    assert len(rows) == 1 + 2  # header + the two classes explained
    browser.find_element(By.ID, "dclose").click()

    shot = Path(os.environ.get("CAMCORE_REPORT_SCREENSHOT") or explained / "report.png")
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as image:
        assert image.size[0] >= 1000 and np.asarray(image.convert("L")).std() > 10  # not a blank page


def test_report_pages_through_ten_thousand_images(browser, tmp_path):
    from selenium.webdriver.common.by import By

    rng = np.random.default_rng(0)
    images = []
    for i in range(10_000):
        if i % 97 == 0:
            images.append({"path": f"photos/{i:05d}.jpg", "width": None, "height": None,
                           "error": f"cannot read image photos/{i:05d}.jpg", "classes": []})
            continue
        c = int(rng.integers(0, 20))
        images.append({"path": f"photos/{i:05d}.jpg", "width": 640, "height": 480, "error": None,
                       "classes": [{"index": c, "name": f"class {c} <b>", "score": float(rng.random()),
                                    "box": [1, 2, 300, 400]}]})
    (tmp_path / "results.json").write_text(json.dumps({"model": "m.onnx", "method": "gradcam", "threshold": 0.2,
                                                        "images": images}))
    _open(browser, write_report(tmp_path))
    assert len(_cards(browser)) == 48  # only the current page is in the document
    assert browser.find_element(By.ID, "range").text == "1\u201348 of 10000"
    browser.find_element(By.ID, "next").click()
    assert browser.find_element(By.ID, "range").text == "49\u201396 of 10000"
    assert "00048.jpg" in _cards(browser)[0].text
    _choose(browser, "class", "7")
    want = sum(1 for r in images if r["classes"] and r["classes"][0]["index"] == 7)
    assert browser.find_element(By.ID, "range").text == f"1\u2013{min(48, want)} of {want}"
    assert all("class 7 <b>" in c.text for c in _cards(browser))  # names are text, never markup
    _choose(browser, "sort", "score-desc")
    scores = _scores(browser)
    best = sorted((r["classes"][0]["score"] for r in images if r["classes"] and r["classes"][0]["index"] == 7),
                  reverse=True)
    assert scores == pytest.approx(best[:48])
    _choose(browser, "class", "")
    _choose(browser, "status", "error")
    assert browser.find_element(By.ID, "range").text == f"1\u201348 of {len(range(0, 10_000, 97))}"


def test_report_data_and_errors(tmp_path):
    with pytest.raises(InvalidInput, match="no results.json or compare.json"):
        report_data(tmp_path)
    (tmp_path / "results.json").write_text("{")
    with pytest.raises(InvalidInput, match="cannot read"):
        report_data(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"model": "m", "images": [
        {"path": "a</script><script>alert(1)</script>.png", "width": 4, "height": 3, "error": None,
         "classes": [{"index": 1, "name": "x", "score": 0.5, "box": None}], "overlay": "a.cam.png"}]}))
    data = report_data(tmp_path)
    assert data["summary"]["images"] == 1 and data["items"][0]["c"] == [[1, "x", 0.5, None]]
    text = render_report(data)
    assert "</script><script>alert" not in text  # the data cannot close its script element
    assert text.count("<script") == 2


def test_report_data_of_a_compare_folder(tmp_path):
    (tmp_path / "compare.json").write_text(json.dumps({
        "model": "m.onnx", "methods": ["cam", "gradcam"], "seconds_per_image": {"cam": 0.01, "gradcam": 0.02},
        "faithfulness": {"cam": {"average_drop": 12.5}, "gradcam": {"average_drop": 10.0}},
        "images": [{"path": "a.png", "width": 4, "height": 3, "grid": "a.compare.png",
                    "classes": [{"index": 2, "name": "two", "score": 0.75}],
                    "boxes": {"cam": [[0, 0, 2, 2]], "gradcam": [None]}}]}))
    data = report_data(tmp_path)
    [item] = data["items"]
    assert item["c"] == [[2, "two", 0.75, [0, 0, 2, 2]]]  # the first method's box
    assert item["v"] == [["methods: cam, gradcam", "a.compare.png"]] and item["o"] == "a.compare.png"
    assert item["b"] == {"cam": [[0, 0, 2, 2]], "gradcam": [None]}
    assert data["summary"]["faithfulness"]["cam"]["average_drop"] == 12.5
    assert data["summary"]["methods"] == ["cam", "gradcam"] and data["summary"]["images"] == 1
