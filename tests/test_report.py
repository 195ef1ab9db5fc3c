"""The run report (flows.report): pages that parse, links that resolve to written files (local and S3), failed
items first, filters, tau variants side by side, paging, idempotent rebuilds that re-encode no thumbnail."""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image

from flows import summary
from flows.report import build as report_build
from flows.report import cards as report_cards
from flows.report import curves as report_curves
from flows.report import page as report_page
from flows.report import thumbs as report_thumbs
from harmonize_core.errors import InputError
from tasks import storage

RUN_ID = "run-1"
PAINTING_SIZE = (600, 400)  # larger than a thumbnail: its thumb must come out 256 x 171
SMALL = (24, 18)
MAGENTA = report_thumbs.OUTLINE_COLOUR
EXTRA_NOTE = 'needs <b>frame</b> & "crop"'
CARD_ORDER = ["gamma", "(no id)", "beta", "alpha", "delta"]  # failed, invalid, warned, completed (by row)
COLUMNS = ["id", "variant", "row", "status", "error", "warnings", "cached", "worker", "tau", "quality_style",
           "quality_structure", "quality_seam", "dilate_s", "pass1_s", "blend_s", "pass2_s", "reconstruct_s", "total_s",
           "pass1_loss", "pass2_loss", "final_uri", "dilate_uri", "pass1_uri", "blend_uri", "pass2_uri",
           "reconstruct_uri", "content_uri", "style_uri", "mask_uri", "outputs", "notes", "licence"]


def png(size: tuple[int, int], colour: tuple[int, int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def mask_png(size: tuple[int, int]) -> bytes:
    image = Image.new("L", size, 0)
    width, height = size
    image.paste(255, (width // 3, height // 3, 2 * width // 3, 2 * height // 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def curves(scale: float) -> dict:
    return {"curves": {"content": [[0, 0.0], [5, 2.0 * scale], [10, 3.0 * scale]],
                       "style_relu3_1": [[0, 100.0], [5, 10.0], [10, 1.0]],
                       "style_relu4_1": [[0, 50.0], [5, 5.0], [10, 0.5]],
                       "tv": [[0, 4.0], [5, 3.0], [10, 2.5]],
                       "total": [[0, 154.0], [5, 20.0], [10, 7.0]]}}


def stage(folder: str, name: str, colour: tuple[int, int, int], metrics: dict | None = None) -> str:
    uri = storage.join(folder, f"{name}.png")
    storage.write_bytes(uri, png(SMALL, colour))
    if metrics is not None:
        storage.write_bytes(storage.join(folder, f"{name}.json"), json.dumps(metrics).encode())
    return uri


def item_inputs(inputs: str, item_id: str, size: tuple[int, int] = SMALL) -> dict[str, str]:
    row = {"content_uri": storage.join(inputs, item_id, "composite.png"),
           "style_uri": storage.join(inputs, item_id, "painting.png"), "mask_uri": storage.join(inputs, item_id, "mask.png")}
    storage.write_bytes(row["content_uri"], png(size, (40, 120, 40)))
    storage.write_bytes(row["style_uri"], png(size, (200, 180, 90)))
    storage.write_bytes(row["mask_uri"], mask_png(size))
    return row


def completed(out: str, inputs: str, item_id: str, row: int, **cells: str) -> dict[str, str]:
    folder = storage.join(out, item_id)
    final = stage(folder, "reconstruct", (90, 90, 200))
    return {"id": item_id, "row": str(row), "status": "completed", "tau": "5", "total_s": "12.5", "pass1_s": "5",
            "pass2_s": "7", **item_inputs(inputs, item_id), "pass1_uri": stage(folder, "pass1", (10, 10, 10), curves(1)),
            "pass2_uri": stage(folder, "pass2", (20, 20, 20), curves(2)), "final_uri": final, "reconstruct_uri": final,
            **cells}


def variants(out: str, inputs: str, item_id: str, row: int, taus: tuple[str, ...]) -> list[dict[str, str]]:
    folder = storage.join(out, item_id)
    shared = {"id": item_id, "row": str(row), "status": "completed", **item_inputs(inputs, item_id),
              "pass1_uri": stage(folder, "pass1", (30, 30, 30), curves(1))}
    rows = []
    for index, tau in enumerate(taus):
        sub = storage.join(folder, f"tau-{tau}")
        final = stage(sub, "reconstruct", (60 * index, 100, 160))
        rows.append({**shared, "variant": f"tau-{tau}", "tau": tau, "quality_style": f"0.{index + 1}",
                     "pass2_uri": stage(sub, "pass2", (5, 5, 5), curves(index + 1)), "final_uri": final,
                     "reconstruct_uri": final, "total_s": "3"})
    return rows


def write_summary(out: str, run_id: str, rows: list[dict[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    uri = storage.run_uri(out, run_id, summary.SUMMARY_NAME)
    storage.write_bytes(uri, buffer.getvalue().encode())
    return uri


def fake_run(out: str, inputs: str, run_id: str = RUN_ID) -> list[dict[str, str]]:
    """Write a run: 2 completed items (one with warnings), 1 failed after pass 1, 1 invalid, 1 id with two taus."""
    alpha = completed(out, inputs, "alpha", 2, notes=EXTRA_NOTE, licence="CC-BY 4.0", quality_style="0.25",
                      quality_structure="0.8", quality_seam="1.5", cached="dilate;pass1", worker="gpu-1")
    storage.write_bytes(alpha["style_uri"], png(PAINTING_SIZE, (200, 180, 90)))  # a painting larger than a thumbnail
    beta = completed(out, inputs, "beta", 3, warnings="mask: touches the border;composite: low JPEG quality")
    gamma_folder = storage.join(out, "gamma")
    gamma = {"id": "gamma", "row": "4", "status": "failed", "tau": "5", **item_inputs(inputs, "gamma"),
             "pass1_uri": stage(gamma_folder, "pass1", (0, 0, 90), curves(1)),
             "error": "pass2: CUDA out of memory <retried 3 times>"}
    invalid = {"id": "", "row": "5", "status": "invalid", "error": "style: file not found: missing.jpg"}
    rows = [alpha, beta, gamma, invalid, *variants(out, inputs, "delta", 6, ("1", "10"))]
    write_summary(out, run_id, rows)
    return rows


class Page(HTMLParser):
    """Collects a report page's links, element ids, cards (in order) and the figures of each card."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.cards: list[dict] = []
        self.classes: list[str] = []
        self.heading: list[str] | None = None
        self.in_badge = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.links += [values[name] for name in ("src", "href") if values.get(name) is not None]
        if values.get("id"):
            self.ids.add(values["id"])
        classes = (values.get("class") or "").split()
        self.classes += classes
        if tag == "article" and "card" in classes:
            self.cards.append({"classes": classes, "id": values.get("id"), "title": "", "figures": [], "imgs": []})
        elif tag == "h2" and self.cards:
            self.heading = []
        elif tag == "small" and self.heading is not None:  # the title is the text between the badge and "row N"
            self.cards[-1]["title"] = "".join(self.heading).strip()
            self.heading = None
        elif tag == "span" and "badge" in classes:
            self.in_badge = True
        elif tag == "figure" and self.cards:
            self.cards[-1]["figures"].append(classes)
        elif tag == "img" and self.cards:
            self.cards[-1]["imgs"].append(values["src"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "span":
            self.in_badge = False

    def handle_data(self, data: str) -> None:
        if self.heading is not None and not self.in_badge:
            self.heading.append(data)


def read_page(uri: str) -> tuple[str, Page]:
    text = storage.read_bytes(uri).decode()
    return text, Page(text)


def resolve_link(page_uri: str, link: str) -> str:
    """Return the URI a relative link on a page points at (an S3 key folded like a static site would)."""
    assert "://" not in link and not link.startswith("/"), f"not a relative link: {link}"
    target = unquote(link.split("#")[0])
    if storage.is_s3(page_uri):
        bucket, key = storage.split_s3(page_uri)
        return f"s3://{bucket}/{posixpath.normpath(posixpath.join(posixpath.dirname(key), target))}"
    return os.path.normpath(os.path.join(os.path.dirname(page_uri), target))


def check_links(page_uri: str, page: Page, out: str) -> None:
    """Every src/href is an in-page #fragment that exists or a relative link to a file written under ``out``."""
    for link in page.links:
        if link.startswith("#"):
            assert link[1:] in page.ids, f"{page_uri}: no element with id {link[1:]}"
            continue
        target = resolve_link(page_uri, link)
        assert storage.exists(target), f"{page_uri}: {link} -> {target} does not exist"
        assert report_thumbs.inside(out, target), f"{link} leaves the output location"


def all_pages(first: str) -> list[tuple[str, str, Page]]:
    """Follow the page links from page 1; return (uri, text, parsed) per page in page order."""
    text, page = read_page(first)
    names = sorted({link for link in page.links if link.startswith("report")},
                   key=lambda n: 1 if n == report_page.REPORT_NAME else int(n.split("-")[1].split(".")[0]))
    pages = [(first, text, page)]
    for name in names[1:]:
        uri = storage.join(storage.parent(first), name)
        pages.append((uri, *read_page(uri)))
    return pages


def count_encodes(monkeypatch) -> list[int]:
    calls = [0]
    original = report_thumbs._encode_thumbnail

    def counting(image):
        calls[0] += 1
        return original(image)

    monkeypatch.setattr(report_thumbs, "_encode_thumbnail", counting)
    return calls


@pytest.fixture
def local_run(tmp_path) -> tuple[str, list[dict[str, str]]]:
    out = str(tmp_path / "out")
    return out, fake_run(out, str(tmp_path / "elsewhere" / "inputs"))


def test_report_page_links_order_filters_variants(local_run):
    out, _ = local_run
    uri = report_build.build_report(out, RUN_ID)
    assert uri == storage.join(out, "runs", RUN_ID, "report.html")
    text, page = read_page(uri)
    check_links(uri, page, out)
    assert [card["title"] for card in page.cards] == CARD_ORDER
    assert "s-failed" in page.cards[0]["classes"] and "s-invalid" in page.cards[1]["classes"]
    assert "warned" in page.cards[2]["classes"]
    for status in ("failed", "invalid", "warned", "completed"):  # filter links and their :target elements
        assert f"#only-{status}" in page.links and f"only-{status}" in page.ids
    delta = page.cards[4]
    assert [classes for classes in delta["figures"] if "variant" in classes] == [["variant"], ["variant"]]
    assert "&tau; = 1</b>" in text and "&tau; = 10</b>" in text and "manifest&#39;s <code>tau</code> column" in text
    assert "&lt;b&gt;frame&lt;/b&gt; &amp; &quot;crop&quot;" in text and "<b>frame</b>" not in text  # cells escaped
    assert "CUDA out of memory &lt;retried 3 times&gt;" in text
    assert "cached: dilate, pass1 &middot; worker gpu-1" in text
    assert "higher is better" in text and "lower is better" in text  # the quality legend: alpha has scores
    assert "<b>style 0.1</b>" in text and "<b>style 0.2</b>" not in text  # the best variant's score in bold
    assert "summary.csv" in page.links


def test_missing_images_are_placeholders_and_thumbs_are_small(local_run):
    out, rows = local_run
    uri = report_build.build_report(out, RUN_ID)
    text, page = read_page(uri)
    gamma = page.cards[0]
    assert len(gamma["imgs"]) == 3  # painting, composite, pass 1; the final was never produced
    assert 'class="missing">not produced' in text and "no loss curve" in text
    assert page.cards[1]["imgs"] == []  # the invalid row has no id and no inputs: nothing to show
    thumbs = [u for u in storage.list_uris(out) if f"/{report_thumbs.THUMBS_DIR}/" in u]
    assert thumbs and all(u.endswith(".jpg") for u in thumbs)
    for thumb in thumbs:
        assert max(Image.open(thumb).size) <= report_thumbs.THUMB_LONG_SIDE
    painting = next(u for u in thumbs if "/alpha/thumbs/painting-" in u)
    assert Image.open(painting).size == (256, 171)
    assert any("/delta/tau-10/thumbs/final-" in u for u in thumbs)  # variant thumbs beside their images
    composite = Image.open(next(u for u in thumbs if "/alpha/thumbs/composite-" in u)).convert("RGB")
    magenta = sum(n for n, (r, g, b) in composite.getcolors(1 << 16) if r > 200 and g < 80 and b > 150)
    assert magenta > 0, "the mask outline is drawn on the composite"
    assert not any(u.startswith(str(Path(rows[0]["style_uri"]).parent)) for u in thumbs)  # inputs' folder untouched


def test_paging_links_every_page(local_run):
    out, _ = local_run
    first = report_build.build_report(out, RUN_ID, page_size=2)
    pages = all_pages(first)
    assert [Path(uri).name for uri, _, _ in pages] == ["report.html", "report-2.html", "report-3.html"]
    titles = []
    for uri, text, page in pages:
        check_links(uri, page, out)
        titles += [card["title"] for card in page.cards]
        assert {"report.html", "report-2.html", "report-3.html"} <= set(page.links)
        assert "5 items" in text and "<b>1</b> failed" in text  # the run's totals on every page
    assert titles == CARD_ORDER
    assert "next &rarr;" in pages[0][1] and "&larr; previous" not in pages[0][1]
    assert "&larr; previous" in pages[2][1] and "next &rarr;" not in pages[2][1]
    report_build.build_report(out, RUN_ID, page_size=200)  # fewer pages now: the old ones go
    assert not storage.exists(storage.join(storage.parent(first), "report-2.html"))


def test_rebuild_is_idempotent_and_reencodes_nothing(local_run, monkeypatch):
    out, rows = local_run
    first = report_build.build_report(out, RUN_ID, page_size=2)
    before = {uri: storage.read_bytes(uri) for uri in storage.list_uris(out)}
    calls = count_encodes(monkeypatch)
    assert report_build.build_report(out, RUN_ID, page_size=2) == first
    assert calls[0] == 0
    assert {uri: storage.read_bytes(uri) for uri in storage.list_uris(out)} == before
    storage.write_bytes(rows[0]["final_uri"], png(SMALL, (250, 0, 0)))  # one changed output: one new thumbnail
    report_build.build_report(out, RUN_ID, page_size=2)
    assert calls[0] == 1


def test_latest_run_is_the_last_summary_written(tmp_path):
    out = str(tmp_path / "out")
    assert report_build.latest_run(out) is None
    with pytest.raises(InputError, match="no run"):
        report_build.build_report(out)
    older = write_summary(out, "zz-older", [{"id": "a", "row": "2", "status": "failed", "error": "boom"}])
    newer = write_summary(out, "aa-newer", [{"id": "b", "row": "2", "status": "completed"}])
    os.utime(older, (1_000_000, 1_000_000))
    assert report_build.latest_run(out) == "aa-newer"
    storage.write_bytes(storage.join(out, "runs", "no-summary", "other.txt"), b"x")  # a folder without a summary
    assert report_build.latest_run(out) == "aa-newer"
    uri = report_build.build_report(out)
    assert uri == storage.join(storage.parent(newer), "report.html")
    _, page = read_page(uri)
    check_links(uri, page, out)
    assert [card["title"] for card in page.cards] == ["b"]


def test_old_summaries_with_few_columns_still_render(tmp_path):
    out = str(tmp_path / "out")
    storage.write_bytes(storage.run_uri(out, "old", summary.SUMMARY_NAME), b"id,row,status,error\nx,2,completed,\ny,3,failed,bad\n")
    uri = report_build.build_report(out, "old")
    _, page = read_page(uri)
    check_links(uri, page, out)
    assert [card["title"] for card in page.cards] == ["y", "x"]


def test_report_markdown_counts_links_and_caps_failures():
    rows = [{"id": f"item-{n:03d}", "row": n + 2, "status": "failed", "error": f"pass2: *bad* [{n}]"} for n in range(60)]
    rows += [{"id": "ok", "row": 99, "status": "completed", "warnings": "mask: small", "total_s": "7200"}]
    text = report_build.report_markdown(rows, "s3://results/out/runs/r/report.html", "s3://results/out/runs/r/summary.csv")
    assert "**1 completed, 60 failed, 0 invalid**, 1 with warnings" in text
    assert "[Open the report](s3://results/out/runs/r/report.html)" in text
    assert "- `item-000` (row 2, failed): pass2: \\*bad\\* \\[0\\]" in text
    assert "item-049" in text and "item-050" not in text and "- and 10 more (see the report)" in text
    local = report_build.report_markdown([], "/tmp/x/report.html", "/tmp/x/summary.csv")
    assert "(file:///tmp/x/report.html)" in local and "Failed" not in local


def test_curve_svg_sums_layers_and_handles_terms_starting_at_zero():
    svg = report_curves.curve_svg(curves(1), "pass 1")
    assert svg.startswith("<svg") and svg.count("<polyline") == 4  # content, style (2 layers summed), tv, total
    assert ">style 1.5</text>" in svg and ">content 3</text>" in svg and ">total 7</text>" in svg
    assert report_curves.curve_svg({}, "pass 2") == "" and report_curves.curve_svg({"curves": {"x": [[0, 0.0]]}}, "p") == ""
    Page(f"<html><body>{svg}</body></html>")  # parses


def test_summary_name_matches_the_flow():
    from flows.summary import SUMMARY_NAME

    assert summary.SUMMARY_NAME == SUMMARY_NAME


def test_report_on_s3_links_resolve_as_keys(s3, monkeypatch):
    out, inputs = "s3://results/out", "s3://data/inputs"
    fake_run(out, inputs)
    first = report_build.build_report(out, page_size=3)  # the run found by listing
    assert first == "s3://results/out/runs/run-1/report.html"
    pages = all_pages(first)
    assert len(pages) == 2
    titles = []
    for uri, _, page in pages:
        check_links(uri, page, out)
        titles += [card["title"] for card in page.cards]
    assert titles == CARD_ORDER
    keys = [obj["Key"] for obj in s3.list_objects_v2(Bucket="data")["Contents"]]
    assert all(key.startswith("inputs/") and "thumbs" not in key for key in keys)  # nothing written beside the inputs
    calls = count_encodes(monkeypatch)
    assert report_build.build_report(out, "run-1", page_size=3) == first and calls[0] == 0


def test_long_curves_are_thinned_but_keep_their_last_point():
    long = {"curves": {"total": [[n, 1000.0 / (n + 1)] for n in range(1001)]}}
    svg = report_curves.curve_svg(long, "pass 2")
    points = svg.split('points="')[1].split('"')[0].split()
    assert len(points) <= report_curves.PLOT_MAX_POINTS + 1
    assert points[-1] == f"{report_curves.PLOT_WIDTH - report_curves.PLOT_PAD},{report_curves.PLOT_HEIGHT - report_curves.PLOT_PAD}"
    assert ">total 0.999</text>" in svg and ">1000 evaluations</text>" in svg


def test_outputs_outside_out_are_thumbnailed_inside_and_never_linked(tmp_path):
    out, elsewhere = str(tmp_path / "out"), str(tmp_path / "elsewhere")
    final = stage(elsewhere, "final", (1, 2, 3))
    write_summary(out, RUN_ID, [{"id": "x", "row": "2", "status": "completed", "final_uri": final,
                                 **item_inputs(elsewhere, "x")}])
    uri = report_build.build_report(out, RUN_ID)
    text, page = read_page(uri)
    check_links(uri, page, out)
    assert len(page.cards[0]["imgs"]) == 3 and "final.png" not in text  # painting, composite, final: thumbs only
    assert any("/x/thumbs/final-" in u for u in storage.list_uris(out))
    assert not any("thumbs" in u for u in storage.list_uris(elsewhere))


def test_many_rows_with_one_id_get_unique_anchors_in_linear_time():
    rows = [{"id": "x", "row": str(n), "status": "invalid"} for n in range(20_000)]
    rows += [{"id": "x-2", "row": "99999", "status": "completed"}]
    started = time.perf_counter()
    cards = report_cards.group_cards(rows)
    seconds = time.perf_counter() - started
    anchors = [card.anchor for card in cards]
    assert seconds < 5, seconds  # 0.2 s measured; the quadratic search it replaced took about 40 s here
    assert len(set(anchors)) == len(anchors) == 20_001
    assert anchors[:3] == ["item-x", "item-x-2", "item-x-3"] and anchors[-1] == "item-x-2-2"
