"""Concurrent requests never reserve more decoded bytes than the in-flight budget; a long wait is a 503."""

from __future__ import annotations

import asyncio

import pytest

from medattn.serving.decode_budget import DecodeBudget, DecodeBudgetExhausted


def test_concurrent_reservations_stay_within_capacity_and_all_complete():
    budget = DecodeBudget(capacity=100, wait_seconds=30)
    peak, done = [0], []

    async def request(i: int, n_bytes: int) -> None:
        async with budget.reserve(n_bytes):
            peak[0] = max(peak[0], budget.reserved)
            assert budget.reserved <= 100
            await asyncio.sleep(0.001 * (i % 3))
        done.append(i)

    async def main() -> None:
        await asyncio.gather(*(request(i, 10 + 7 * (i % 9)) for i in range(60)))

    asyncio.run(main())
    assert len(done) == 60 and budget.reserved == 0
    assert 60 < peak[0] <= 100  # requests did overlap, up to the budget and never past it


def test_a_request_larger_than_the_budget_runs_alone():
    budget = DecodeBudget(capacity=50, wait_seconds=5)

    async def main() -> int:
        async with budget.reserve(500):
            return budget.reserved

    assert asyncio.run(main()) == 50


def test_waiting_past_the_limit_is_a_503_and_releases_nothing_it_did_not_take():
    budget = DecodeBudget(capacity=100, wait_seconds=0.05)

    async def main() -> None:
        async with budget.reserve(80):
            with pytest.raises(DecodeBudgetExhausted) as info:
                async with budget.reserve(30):
                    raise AssertionError("must not get the budget")
            assert info.value.status_code == 503 and "limit in flight is 100 bytes" in str(info.value)
            assert budget.reserved == 80
        assert budget.reserved == 0

    asyncio.run(main())
