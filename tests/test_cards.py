"""Cards of the session's small run render offline with their figures."""

from __future__ import annotations

import base64
import json
import re

import pytest
from metaflow.cards import get_cards

PNG = "data:image/png;base64"


def _card_html(run, step: str) -> str:
    cards = get_cards(run[step].task)
    assert len(cards) >= 1
    return cards[0].get()


def _card_content(html: str) -> str:
    """Decode the card's content, which the HTML embeds as base64 JSON."""
    encoded = re.findall(r'__MF_DATA__\["[^"]+"\] = "([A-Za-z0-9+/=]+)"', html)
    assert encoded
    return "".join(json.dumps(json.loads(base64.b64decode(e))) for e in encoded)


@pytest.mark.parametrize(
    ("step", "texts", "images"),
    [
        ("split", ["Rows and class balance", "Missing values per column"], 6),
        (
            "join_tuning",
            ["Trials per worker", "Optimisation history", "Best parameters"],
            1,
        ),
        (
            "evaluate",
            [
                "ROC curve",
                "Precision-recall curve",
                "Confusion matrix",
                "Calibration",
                "boosted trees",
            ],
            4,
        ),
        ("deploy", ["Sample request", "model_uri", "probability"], 0),
    ],
)
def test_card_has_sections_and_images(small_run, step, texts, images):
    content = _card_content(_card_html(small_run, step))
    for text in texts:
        assert text in content
    assert content.count(PNG) >= images


def test_cards_fetch_nothing_at_render(small_run):
    html = _card_html(small_run, "evaluate")
    assert '<script src="http' not in html


def test_tune_cards_show_progress(small_run):
    for task in small_run["tune"]:
        content = _card_content(get_cards(task)[0].get())
        assert "Tuning worker" in content
        assert "validation PR AUC" in content
