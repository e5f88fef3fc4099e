"""Headless Debian Chromium driven by Playwright, for the pages users look at (MLflow UI, task pages)."""

from __future__ import annotations

import contextlib
import re
import shutil
from typing import Iterator

import pytest

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling out, which this closed network refuses.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@contextlib.contextmanager
def chromium_page(width: int = 2000, height: int = 900) -> Iterator:
    if shutil.which(CHROMIUM) is None:
        pytest.skip("Debian chromium is not installed; scripts/setup.sh installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def show_columns(page, names: list[str]) -> None:
    """Tick ``names`` (params / metrics) in the MLflow runs table's column selector."""
    page.get_by_test_id("column-selection-dropdown").first.click()
    dialog = page.get_by_role("dialog")
    for name in names:
        dialog.get_by_placeholder("Search columns").fill(name)
        node = dialog.locator(".du-bois-light-tree-treenode").filter(
            has=page.locator(".du-bois-light-tree-title", has_text=re.compile(f"^{re.escape(name)}$")))
        node.first.locator(".du-bois-light-tree-checkbox").click()
    page.keyboard.press("Escape")
    page.locator("[role=columnheader]").filter(has_text=re.compile(f"^{re.escape(names[-1])}$")).first.wait_for(
        timeout=30_000)


def row_cells(page, name: str) -> list[str]:
    """The words in the MLflow runs table row of run ``name``, across the grid's pinned and scrolled parts
    (each part is a separate element with the same ``row-index``)."""
    # the row holding an element whose whole text is the name: team-k-1's row is not team-k-10's
    index = page.get_by_role("row").filter(has=page.get_by_text(name, exact=True)).first.get_attribute("row-index")
    return " ".join(page.locator(f"[role=row][row-index='{index}']").all_inner_texts()).split()
