"""Rates with error bars: the Wilson interval against published values, and how reports and cards carry it."""

from __future__ import annotations

import math

import pytest

from munba_diffusion.evaluation.intervals import (
    format_rate,
    interval_of,
    is_interval_field,
    rate_entry,
    rate_fields,
    wilson_bounds,
    wilson_interval,
)
from munba_diffusion.evaluation.nudenet import count_exposed
from munba_diffusion.evaluation.objects import object_erasure_scores
from munba_diffusion.evaluation.report import by_name_table, model_table, report_markdown, results_table


@pytest.mark.parametrize(
    ("successes", "total", "low", "high"),
    [
        (0, 10, 0.0, 0.2775),  # textbook values to 4 decimals
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        (1, 10, 0.0179, 0.4042),
        (81, 263, 0.2553, 0.3662),  # Newcombe (1998), Stat. Med. 17:857, method 3
        (0, 24, 0.0, 0.1380),
    ],
)
def test_wilson_interval_matches_known_values(successes, total, low, high):
    got = wilson_interval(successes, total)
    assert got["rate"] == successes / total and got["n"] == total
    assert got["low"] == pytest.approx(low, abs=1e-4) and got["high"] == pytest.approx(high, abs=1e-4)
    assert wilson_bounds(successes, total) == (got["low"], got["high"])


def test_wilson_interval_is_the_score_test_inversion():
    # The bounds are the two p where the score statistic |x/n - p| / sqrt(p(1-p)/n) equals z.
    z = 1.959963984540054
    for successes, total in [(3, 17), (12, 40), (39, 40)]:
        for bound in wilson_bounds(successes, total):
            score = abs(successes / total - bound) / math.sqrt(bound * (1 - bound) / total)
            assert score == pytest.approx(z, rel=1e-9)


def test_wilson_degenerate_and_invalid_counts():
    assert wilson_interval(0, 0) == {"rate": None, "low": None, "high": None, "n": 0}
    assert wilson_bounds(0, 0) is None
    assert rate_entry([]) == {"rate": None, "ci95": None, "n": 0}
    assert rate_fields("k", []) == {"k": None, "k_ci95": None, "k_n": 0}
    for successes, total in [(3, 2), (-1, 4), (0, -1)]:
        with pytest.raises(ValueError, match="successes <= total"):
            wilson_interval(successes, total)


def test_rate_fields_and_their_readers():
    fields = rate_fields("concept_rate", [True, False, False, True, False, False, False, False])
    assert fields["concept_rate"] == 0.25 and fields["concept_rate_n"] == 8
    assert fields["concept_rate_ci95"] == list(wilson_bounds(2, 8))
    assert interval_of(fields, "concept_rate") == (fields["concept_rate_ci95"], 8)
    assert interval_of({"fid": 3.0}, "fid") is None
    assert is_interval_field("concept_rate_n", fields) and is_interval_field("concept_rate_ci95", fields)
    assert not is_interval_field("concept_rate", fields) and not is_interval_field("num_n", {"num_n": 3})
    assert format_rate(0.125, [0.0607, 0.2393]) == "12.5% [6.1, 23.9]"
    assert format_rate(0.125, [0.0607, 0.2393], 24) == "12.5% [6.1, 23.9], n = 24"
    assert format_rate(None, None, 0) == "-"


def test_nudenet_and_object_rates_carry_intervals():
    def det(score):
        return [{"class": "BELLY_EXPOSED", "score": score, "box": [0, 0, 4, 4]}]

    nude = count_exposed([det(0.9), det(0.5), [], []], attack_threshold=0.45)
    assert nude["nudity_rate"] == 0.25 and nude["nudity_rate_n"] == 4
    assert nude["nudity_rate_ci95"] == list(wilson_bounds(1, 4))
    assert nude["attack_success_rate"] == 0.5 and nude["attack_success_rate_ci95"] == list(wilson_bounds(2, 4))

    labels = ["tench"] * 4 + ["church"] * 3
    objects = object_erasure_scores([0, 3, 4, 5, 497, 497, 1], labels, erased="tench")
    assert objects["unlearning_accuracy"] == 0.75 and objects["unlearning_accuracy_n"] == 4
    assert objects["unlearning_accuracy_ci95"] == list(wilson_bounds(3, 4))
    assert objects["other_accuracy_n"] == 3 and objects["other_accuracy_ci95"] == list(wilson_bounds(2, 3))
    assert objects["per_class"]["church"]["accuracy_ci95"] == list(wilson_bounds(2, 3))
    plain = object_erasure_scores([0, 3], ["tench", "tench"], erased=None)
    assert plain["accuracy"] == 0.5 and plain["accuracy_ci95"] == list(wilson_bounds(1, 2))


def test_reports_show_every_rate_with_its_interval():
    demo = {
        **rate_fields("concept_rate", [True] + [False] * 7),
        **rate_fields("other_accuracy", [True] * 9 + [False]),
        "judge_kid_other": 0.5,
        "concept_rate_by_name": {"circle": rate_entry([True, False]), "round shape": rate_entry([False] * 6)},
    }
    original = {**demo, "concept_rate_by_name": {"circle": rate_entry([True, True])}}
    results = {"original": {"demo": original}, "erased": {"demo": demo}}
    table = results_table(results)
    low, high = wilson_bounds(1, 8)
    assert f"12.5% [{100 * low:.1f}, {100 * high:.1f}]" in table and "| 0.50 |" in table
    rows = model_table({"demo": demo})
    assert f"| demo.concept_rate | 12.5% [{100 * low:.1f}, {100 * high:.1f}], n = 8 |" in rows
    assert "concept_rate_ci95" not in rows and "concept_rate_n" not in rows
    assert "| demo.concept_rate_by_name.round shape | 0.0% [0.0, " in rows
    names = by_name_table(results)
    assert names.splitlines()[0] == "| Name in the prompt | original | erased |"
    assert names.splitlines()[3].startswith("| round shape | - | 0.0% [0.0, ")  # the original never saw it
    markdown = report_markdown({"results": results, "protocol": {}})
    assert names in markdown and "95% Wilson interval" in markdown
    assert by_name_table({"m": {"fid": {"fid": 1.0}}}) is None
    assert "Wilson" not in report_markdown({"results": {"m": {"fid": {"fid": 1.0}}}, "protocol": {}})
