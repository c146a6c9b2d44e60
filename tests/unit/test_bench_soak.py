"""bench soak's arithmetic: the driver's growth per request and per minute."""

from __future__ import annotations

import pytest

from bench.soak import growth


def test_growth_is_the_slope_after_the_warm_up() -> None:
    # 100 requests a minute; the driver grows 0.5 MB a minute after a jump during the warm-up
    samples = [{"t_s": 60.0 * k, "requests_done": 100 * k, "driver": (80.0 if k >= 3 else 60.0 + k) + 0.5 * k}
               for k in range(11)]
    out = growth(samples, warmup_s=180.0)
    assert out["samples"] == 8 and out["requests"] == 700 and out["from_t_s"] == 180.0
    assert out["mb_per_minute"] == pytest.approx(0.5)
    assert out["kb_per_request"] == pytest.approx(0.5 * 1024 / 100)


def test_growth_without_enough_samples_is_unknown() -> None:
    assert growth([{"t_s": 200.0, "requests_done": 5, "driver": 80.0}], warmup_s=180.0)["kb_per_request"] is None
