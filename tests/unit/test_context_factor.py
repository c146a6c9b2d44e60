"""Context-length scaling of a trace: lengths, block ids, sharing, arrivals, bad factors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netkv.request import BLOCK_TOKENS, matched_prefix_blocks
from netkv.serving.config import ReplayConfig, ReplayConfigError
from netkv.traces import DEFAULT_TRACE, MAX_CONTEXT_FACTOR, TraceError, load_trace, scale_context


def _write(tmp_path: Path, rows: list[tuple[float, int, int, list[int]]]) -> Path:
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"timestamp": ts, "input_length": n, "output_length": out, "hash_ids": ids}) + "\n"
                            for ts, n, out, ids in rows))
    return path


def test_known_expansion() -> None:
    # 600 tokens = one full block (7) + 88 tokens (9); x2: 1200 tokens = 3 blocks
    assert scale_context(600, (7, 9), 2) == (1200, (14, 15, 18))
    # x3: 1800 tokens = 4 blocks: 7 -> 21, 22, 23; the 88-token block -> 264 tokens -> 1 block
    assert scale_context(600, (7, 9), 3) == (1800, (21, 22, 23, 27))
    assert scale_context(600, (7, 9), 1) == (600, (7, 9))
    assert scale_context(1024, (0, 1), 4) == (4096, tuple(range(8)))


def test_sharing_lengths_and_arrivals_on_a_file(tmp_path: Path) -> None:
    # requests 1 and 2 share a 3-block prefix; request 3 shares 1 block with them
    path = _write(tmp_path, [(0, 1800, 10, [5, 6, 7, 8]), (250.5, 2000, 3, [5, 6, 7, 40]), (900, 100, 1, [5])])
    base = load_trace(path).requests
    for k in (1, 2, 5):
        scaled = load_trace(path, context_factor=k).requests
        assert [r.arrival_ms for r in scaled] == [r.arrival_ms for r in base] == [0.0, 250.5, 900.0]
        assert [r.output_tokens for r in scaled] == [10, 3, 1]
        assert [r.input_tokens for r in scaled] == [k * 1800, k * 2000, k * 100]
        assert [len(r.hash_ids) for r in scaled] == [math.ceil(k * n / BLOCK_TOKENS) for n in (1800, 2000, 100)]
        a, b, c = (r.hash_ids for r in scaled)
        assert matched_prefix_blocks(b, set(a)) == 3 * k
        assert matched_prefix_blocks(a, set(b)) == 3 * k
        assert matched_prefix_blocks(a, set(c)) == min(1 * k, len(c))


@given(st.lists(st.integers(0, 10**12), min_size=1, max_size=40), st.integers(1, 512), st.integers(1, 64),
       st.integers(0, 40))
def test_scaling_is_a_stretch_of_every_token(ids: list[int], last_tokens: int, k: int, cut: int) -> None:
    n = (len(ids) - 1) * BLOCK_TOKENS + last_tokens
    scaled_n, scaled = scale_context(n, tuple(ids), k)
    assert scaled_n == k * n and len(scaled) == math.ceil(k * n / BLOCK_TOKENS)
    # new token t is old token t // k; its block id is derived from the old block only
    for new_block, h in enumerate(scaled):
        old_block = (new_block * BLOCK_TOKENS) // (k * BLOCK_TOKENS)
        assert h // k == ids[old_block]
    # a request with a prefix of `cut` of these blocks shares exactly cut*k scaled blocks
    cut = min(cut, len(ids) - 1)
    other = ids[:cut] + [10**13 + j for j in range(len(ids) - cut)]
    _, scaled_other = scale_context(n, tuple(other), k)
    assert matched_prefix_blocks(scaled_other, set(scaled)) == cut * k
    # distinct blocks stay distinct
    assert len(set(scaled)) == len(scaled) or len(set(ids)) < len(ids)


def test_real_trace_total_tokens_scale() -> None:
    base = load_trace(DEFAULT_TRACE, duration_s=30).requests
    three = load_trace(DEFAULT_TRACE, duration_s=30, context_factor=3).requests
    assert [r.request_id for r in three] == [r.request_id for r in base]
    assert sum(r.input_tokens for r in three) == 3 * sum(r.input_tokens for r in base)


@pytest.mark.parametrize("bad", [0, -1, 1.5, 2.0, True, "2", None, MAX_CONTEXT_FACTOR + 1])
def test_bad_factor_is_refused_with_one_line(bad: object) -> None:
    with pytest.raises(TraceError, match=r"^context_factor must be a whole number in \[1, 1000\] .*got ") as err:
        load_trace(DEFAULT_TRACE, max_requests=1, context_factor=bad)  # type: ignore[arg-type]
    assert "\n" not in str(err.value)
    with pytest.raises(ReplayConfigError, match=r"^context_factor must be a whole number in \[1, 1000\], got "):
        ReplayConfig(context_factor=bad)  # type: ignore[arg-type]


def test_replay_config_threads_the_factor_to_its_window() -> None:
    cfg = ReplayConfig.from_dict({"duration_s": 10.0, "context_factor": 4})
    base = ReplayConfig.from_dict({"duration_s": 10.0})
    assert base.context_factor == 1
    assert [r.input_tokens for r in cfg.window().requests] == [4 * r.input_tokens for r in base.window().requests]
    assert "context_factor [x] (default 1)" in ReplayConfig.help_text()
    assert ReplayConfig.from_dict(cfg.to_dict()).context_factor == 4


def test_trace_span_is_the_last_timestamp(tmp_path: Path) -> None:
    from netkv.traces import trace_span_s

    path = _write(tmp_path, [(0, 10, 1, [1]), (1500, 10, 1, [2]), (98_765, 10, 1, [3])])
    assert trace_span_s(path) == 98.765
    last = [line for line in DEFAULT_TRACE.read_text().splitlines() if line.strip()][-1]
    assert trace_span_s(DEFAULT_TRACE) == json.loads(last)["timestamp"] / 1000.0
