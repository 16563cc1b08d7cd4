"""A per-process budget of decoded bytes in flight, shared by concurrent requests.

The per-request limit (``MEDATTN_MAX_BATCH_DECODED_BYTES``) bounds one request; many clients at
once could still add up. Each prediction request reserves its header estimate here before it
decodes and releases it when its answer is built: requests beyond
``MEDATTN_MAX_INFLIGHT_DECODED_BYTES`` wait their turn (in arrival order of wake-up), and one that
waits longer than ``MEDATTN_DECODE_WAIT_SECONDS`` is answered 503 with ``Retry-After`` instead of
being queued without end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from medattn.errors import MedattnError


class DecodeBudgetExhausted(MedattnError):
    """The service is decoding as much as its memory budget allows; retry shortly."""

    status_code = 503


class DecodeBudget:
    """``async with budget.reserve(n_bytes):`` - at most ``capacity`` bytes reserved at once."""

    def __init__(self, capacity: int, wait_seconds: float) -> None:
        self.capacity = capacity
        self.wait_seconds = wait_seconds
        self.reserved = 0
        self._changed: asyncio.Condition | None = None  # made in the event loop that uses it

    @asynccontextmanager
    async def reserve(self, n_bytes: int) -> AsyncIterator[None]:
        # A request larger than the whole budget (a smaller in-flight than per-request setting)
        # still runs, alone.
        n_bytes = max(0, min(n_bytes, self.capacity))
        if self._changed is None:
            self._changed = asyncio.Condition()
        changed = self._changed
        async with changed:
            try:
                await asyncio.wait_for(changed.wait_for(lambda: self.reserved + n_bytes <= self.capacity),
                                       self.wait_seconds)
            except asyncio.TimeoutError:
                raise DecodeBudgetExhausted(
                    f"the service is decoding {self.reserved} bytes of images, its limit in flight is "
                    f"{self.capacity} bytes; retry shortly") from None
            self.reserved += n_bytes
        try:
            yield
        finally:
            async with changed:
                self.reserved -= n_bytes
                changed.notify_all()
