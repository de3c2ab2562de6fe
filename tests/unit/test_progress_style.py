"""Which progress bar a driver shows: tqdm's notebook widget only in a Jupyter kernel that has
ipywidgets, tqdm's text bar otherwise; DOREDIS_PROGRESS_STYLE can force text."""

from __future__ import annotations

import logging
import sys

import pytest

from doredis.driver import progressbar
from doredis.driver.progressbar import ProgressBar, choose_style


@pytest.mark.parametrize(
    ("kernel", "widgets", "env", "expected"),
    [
        (True, True, {}, "notebook"),
        (True, False, {}, "text"),  # tqdm.notebook would raise "IProgress not found"
        (False, True, {}, "text"),  # a terminal or a script, whatever is installed
        (False, False, {}, "text"),
        (True, True, {"DOREDIS_PROGRESS_STYLE": "text"}, "text"),  # e.g. a front end without widgets
        (True, True, {"DOREDIS_PROGRESS_STYLE": " Auto "}, "notebook"),
        (True, True, {"DOREDIS_PROGRESS_STYLE": "notebook"}, "notebook"),
        (True, True, {"DOREDIS_PROGRESS_STYLE": ""}, "notebook"),
    ],
)
def test_choose_style(kernel: bool, widgets: bool, env: dict[str, str], expected: str) -> None:
    assert choose_style(kernel, widgets, env) == expected


@pytest.mark.parametrize(("kernel", "why"), [(True, "ipywidgets is not installed"), (False, "not a Jupyter")])
def test_asking_for_the_widget_where_it_cannot_work_falls_back_to_text(
    kernel: bool, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="doredis.driver"):
        assert choose_style(kernel, False, {"DOREDIS_PROGRESS_STYLE": "notebook"}) == "text"
    assert why in caplog.text


def test_an_unknown_style_is_named_and_auto_used(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="doredis.driver"):
        assert choose_style(True, True, {"DOREDIS_PROGRESS_STYLE": "widget"}) == "notebook"
        assert choose_style(False, True, {"DOREDIS_PROGRESS_STYLE": "widget"}) == "text"
    assert "'widget'" in caplog.text and "auto, notebook, text" in caplog.text


def test_outside_a_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest is no kernel: the text bar, shown by default only on a terminal."""
    assert not progressbar.in_kernel()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert progressbar.wanted(None) is False
    assert progressbar.wanted(True) is True and progressbar.wanted(False) is False
    bar = ProgressBar(True, 3, "r1")
    try:
        assert not bar.widget and type(bar.bar).__module__ == "tqdm.std"
    finally:
        bar.close()


def test_a_kernel_shows_a_bar_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """ipykernel's stderr is no terminal: a kernel is reason enough for the bar."""
    monkeypatch.setattr(progressbar, "in_kernel", lambda: True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert progressbar.wanted(None) is True


def test_the_widget_learns_its_total_and_ends_green_or_red(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's bar starts without a total (tqdm's widget then draws a full "info" stub) and gets it
    once the run is submitted; a bar closed short of its total (a failed or cancelled run) is red."""
    pytest.importorskip("ipywidgets")
    monkeypatch.setattr(progressbar, "in_kernel", lambda: True)  # outside a kernel display() prints text
    monkeypatch.delenv("DOREDIS_PROGRESS_STYLE", raising=False)
    for done, style in ((5, "success"), (3, "danger")):
        bar = ProgressBar(True, None, "r1")
        assert bar.widget
        _, widget, _ = bar.bar.container.children
        assert widget.bar_style == "info"
        bar.set_total(5)
        assert (widget.max, widget.bar_style, widget.layout.width) == (5, "", None)
        bar.workers(2)
        bar.advance(done)
        bar.close()
        assert (widget.value, widget.bar_style) == (done, style)
        assert f"{done}/5" in repr(bar.bar.container) and "workers=2" in repr(bar.bar.container)
