"""Every stage's result yields its funnel rows the same way: its outcomes, then its failed shards' rows."""
from tessera.pipelines.intake import DownloadResult
from tessera.pipelines.tokenize import TokenizeResult


def test_a_result_lists_its_outcomes_by_reason_then_the_rows_of_its_failed_shards():
    result = DownloadResult(rows_in=20, downloaded=12, dropped={"timeout": 2, "http_404": 1}, shards=2,
                            failed={"00002": "boom"}, failed_rows=5)
    assert result.funnel() == [
        {"stage": "download", "outcome": "downloaded", "reason": "", "count": 12},
        {"stage": "download", "outcome": "dropped", "reason": "http_404", "count": 1},
        {"stage": "download", "outcome": "dropped", "reason": "timeout", "count": 2},
        {"stage": "download", "outcome": "failed", "reason": "shard_failed", "count": 5},
    ]
    assert sum(r["count"] for r in result.funnel()) == result.rows_in


def test_a_stage_with_several_outputs_closes_each_with_its_failed_rows():
    counts = {"tokenized": 5, "no_caption": 1, "dropped": {"too_small": 2}}
    result = TokenizeResult({256: counts, 512: counts}, failed={"00001": "boom"}, failed_rows=3)
    stages = [(r["stage"], r["outcome"], r["reason"]) for r in result.funnel()]
    assert stages == [
        ("tokenize_256", "tokenized", ""), ("tokenize_256", "tokenized", "no_caption"),
        ("tokenize_256", "dropped", "too_small"), ("tokenize_256", "failed", "shard_failed"),
        ("tokenize_512", "tokenized", ""), ("tokenize_512", "tokenized", "no_caption"),
        ("tokenize_512", "dropped", "too_small"), ("tokenize_512", "failed", "shard_failed"),
    ]
