from __future__ import annotations

import pytest

from kasched.rates import rate_bits


@pytest.mark.parametrize(
    ("text", "bits"),
    [("10mbit", 10_000_000), ("1gbit", 10**9), ("2.5Gbit", 2_500_000_000), ("800kbit", 800_000), ("96bit", 96)],
)
def test_rates_as_tc_writes_them(text: str, bits: int) -> None:
    assert rate_bits(text) == bits


@pytest.mark.parametrize("text", ["10", "10mbps", "1 gigabit", "0mbit", "-5mbit", "", "mbit"])
def test_anything_else_is_refused_with_the_accepted_form(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a link rate such as 100mbit, 1gbit or 2\.5gbit"):
        rate_bits(text)
