"""The suite runs in a temporary home and cache, and its report check catches what a reader must not see."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import TEST_HOME, shown_nan

from weightlab.demo import cache_dir
from weightlab.options import CacheOptions, user_cache


def test_every_cache_and_the_home_are_temporary_and_the_real_cache_is_watched():
    real = Path(os.environ["WEIGHTLAB_TESTS_REAL_CACHE"])
    assert Path.home() == TEST_HOME
    for folder in (user_cache(), cache_dir(), CacheOptions().folder):
        assert folder is not None and folder.resolve() != real.resolve()
        assert real.resolve() not in folder.resolve().parents
    assert user_cache().is_relative_to(TEST_HOME) and cache_dir().is_relative_to(TEST_HOME)
    assert TEST_HOME not in real.parents  # the watched folder is the user's, not ours


def test_the_report_check_sees_values_that_are_not_numbers_and_not_the_method_named_nan():
    shown = [
        "<h3>Q-Q, R² = nan</h3>",
        "<td data-v='nan'>x</td>",
        "| layer | inf |",
        "α -inf",
        "<div class='v'>NaN</div>",
        "ratio Infinity",
    ]
    for html in shown:
        assert shown_nan(html), html
    named = [
        "<h2>Merge: nan, NAN on weights, per tensor, λ 1</h2>",
        "<div class='v' data-key='merge.method' data-v='nan'>nan</div>",
        "| method | nan |",
        "weightlab merge --method nan a b",
        "NAN (weights) keeps 0.688; nan-weights/; info; infinite; nanometre",
        "<img src='data:image/png;base64,nanAinf'>",
    ]
    for html in named:
        assert not shown_nan(html), html
