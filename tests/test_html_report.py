"""``onnxpq report OUT.report.json --html PAGE``: one self-contained page whose plots render in a real browser."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct

import numpy as np
import onnx
import pytest
from conftest import make_model, rand
from onnx import helper

from onnxpq import CompressConfig, compress
from onnxpq.cli import main
from onnxpq.pipeline import ValidationSettings

pytest.importorskip("matplotlib", reason="the HTML report draws with matplotlib (pip install 'onnxpq[report]')")

IMAGE = re.compile(r"<img alt='([^']*)' src='data:image/png;base64,([^']+)'>")


@pytest.fixture(scope="module")
def report_file(tmp_path_factory):
    """A searched compression of a small classifier: every plot of the page has data."""
    folder = tmp_path_factory.mktemp("page")
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"]), helper.make_node("Relu", ["h0"], ["r0"])]
    nodes.append(helper.make_node("MatMul", ["r0", "w1"], ["y"]))
    weights = {"w0": rand(rng, 64, 64) / 8, "w1": rand(rng, 64, 10) / 8}
    onnx.save(make_model(nodes, [("x", ["n", 64])], ["y"], weights), folder / "in.onnx")
    np.savez(folder / "calib.npz", x=rand(rng, 64, 64))
    np.savez(folder / "val.npz", x=rand(rng, 100, 64))
    compress(
        folder / "in.onnx",
        folder / "out.onnx",
        CompressConfig(min_elements=512, keep_first=False, target_bpw="auto"),
        calibration=folder / "calib.npz",
        validation=ValidationSettings(data=folder / "val.npz", metric="kl", max_degradation=0.05, measure=False),
    )
    return folder / "out.onnx.report.json"


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _page(report_file, tmp_path) -> str:
    page = tmp_path / "report.html"
    assert main(["report", str(report_file), "--html", str(page)]) == 0
    return page.read_text()


def test_the_page_is_one_file_with_every_plot_embedded(report_file, tmp_path):
    text = _page(report_file, tmp_path)
    images = IMAGE.findall(text)
    titles = [title for title, _ in images]
    assert titles == [
        "Bits per weight of each layer",
        "Where the compressed bytes go",
        "Error per layer, worst first",
        "Budget search: degradation against size",
    ]
    for _, data in images:
        width, height = _png_size(base64.b64decode(data))
        assert width > 100 and height > 50
    assert "http://" not in text and "https://" not in text  # nothing to fetch: it opens offline
    report = json.loads(report_file.read_text())
    assert f"{report['pqf']['bits_per_weight_all_parameters']:.3f}" in text
    assert "gate: passed: kl within 0.05" in text


def test_a_report_without_data_draws_what_it_has(report_file, tmp_path):
    """No search, no validation, no output SQNR: the page still renders, with the plots that apply."""
    report = json.loads(report_file.read_text())
    report.update(search=None, validation=None)
    for row in report["layers"]:
        row["output_sqnr_db"] = None
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(report))
    titles = [t for t, _ in IMAGE.findall(_page(plain, tmp_path))]
    assert titles == ["Bits per weight of each layer", "Where the compressed bytes go", "Error per layer, worst first"]


def test_a_search_with_infinite_degradations_draws_its_finite_tries(report_file, tmp_path):
    """The JSON writes an infinite degradation (NaN outputs) as "inf": the curve draws the finite tries."""
    report = json.loads(report_file.read_text())
    report["search"]["tries"][0]["degradation"] = "inf"
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps(report))
    assert "Budget search: degradation against size" in [t for t, _ in IMAGE.findall(_page(odd, tmp_path))]


@pytest.mark.parametrize(
    ("content", "message"),
    [("{", "not a readable JSON report"), ('{"a": 1}', "not an onnxpq report"), (None, "report not found")],
)
def test_what_is_not_a_report_is_refused(tmp_path, capsys, content, message):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    assert main(["report", str(path), "--html", str(tmp_path / "p.html")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.html").exists()


def test_the_page_never_replaces_a_file_unasked_nor_the_report(report_file, tmp_path, capsys):
    page = tmp_path / "p.html"
    page.write_text("keep")
    assert main(["report", str(report_file), "--html", str(page)]) == 2
    assert page.read_text() == "keep" and "--force" in capsys.readouterr().err
    assert main(["report", str(report_file), "--html", str(page), "--force"]) == 0
    before = report_file.read_text()
    assert main(["report", str(report_file), "--html", str(report_file), "--force"]) == 2
    assert report_file.read_text() == before


def test_without_html_the_table_is_printed(report_file, capsys):
    assert main(["report", str(report_file)]) == 0
    out = capsys.readouterr().out
    assert "bits/weight" in out and "budget search (kl <= 0.05)" in out


def _browser():
    """A headless Chromium driven by Selenium, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra has it)")
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("no Chromium and chromedriver here (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(options=options, service=Service(driver))


def test_the_page_renders_in_a_real_browser(report_file, tmp_path):
    """Every image decodes in Chromium with a non-zero size, and the console logs no error."""
    page = tmp_path / "report.html"
    assert main(["report", str(report_file), "--html", str(page)]) == 0
    browser = _browser()
    try:
        browser.get(page.as_uri())
        sizes = browser.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        browser.quit()
    assert len(sizes) >= 3
    assert all(done and width > 0 and height > 0 for done, width, height in sizes), sizes
    assert not errors, errors
