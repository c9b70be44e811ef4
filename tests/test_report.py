"""report: Markdown tables, aggregation over seeds, mean ± sd."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pyrovae.report import aggregate, format_summary, markdown_table, mean_std


def test_markdown_table_formats_floats_nan_ints_and_pipes():
    df = pd.DataFrame({"x": [1.23456, np.nan], "n": [3, 4], "s": ["a|b", None]}, index=["r1", "r2"])
    df.index.name = "method"
    assert markdown_table(df).splitlines() == [
        "| method | x | n | s |",
        "|---|---|---|---|",
        "| r1 | 1.235 | 3 | a\\|b |",
        "| r2 | – | 4 | – |",
    ]
    assert markdown_table(df, floatfmt="{:.1f}", index=False).splitlines()[2] == "| 1.2 | 3 | a\\|b |"


def test_mean_std():
    assert mean_std(1.0, 0.25) == "1.000 ± 0.250"
    assert mean_std(1.0, float("nan"), "{:.2f}") == "1.00"
    assert mean_std(1.0) == "1.000"
    assert mean_std(float("nan"), 1.0) == "–" and mean_std(None) == "–"


def test_aggregate_and_format_summary():
    res = pd.DataFrame(
        {"model": ["b", "a", "b", "a", "a"], "m": [1.0, 2.0, 3.0, 4.0, np.nan], "other": [1] * 5}
    )
    agg = aggregate(res, ["model"], ["m", "absent"], order={"model": ["a", "b"]})
    assert agg["model"].tolist() == ["a", "b"] and agg["n"].tolist() == [3, 2]
    assert agg["m_mean"].tolist() == [3.0, 2.0]  # the NaN is ignored
    assert np.allclose(agg["m_std"], [np.std([2, 4], ddof=1), np.std([1, 3], ddof=1)])
    assert "absent_mean" not in agg.columns
    table = format_summary(agg, ["model"], {"m": "M", "absent": "A"}, {"m": "{:.1f}"})
    assert table.columns.tolist() == ["model", "n", "M"]
    assert table["M"].tolist() == ["3.0 ± 1.4", "2.0 ± 1.4"]
