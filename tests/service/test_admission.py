"""Admission control on its own event loop: slots, the first-come line, expiry, the byte budget."""

from __future__ import annotations

import asyncio

import pytest

from service.admission import Admission
from service.errors import Overloaded


def run(coro):
    return asyncio.run(coro)


def test_slots_then_a_line_served_in_arrival_order() -> None:
    async def main() -> list[int]:
        adm = Admission(max_requests=2, max_bytes=10**9, wait_s=5, max_waiting=10)
        held = [await adm.admit(None), await adm.admit(None)]
        order: list[int] = []

        async def waiter(i: int) -> None:
            ticket = await adm.admit(None)
            order.append(i)
            await asyncio.sleep(0)
            ticket.release()

        tasks = [asyncio.create_task(waiter(i)) for i in range(4)]
        await asyncio.sleep(0.01)
        assert order == [] and len(adm.waiters) == 4 and adm.requests == 2
        held[0].release()
        held[1].release()
        await asyncio.gather(*tasks)
        assert adm.requests == 0 and not adm.waiters
        return order

    assert run(main()) == [0, 1, 2, 3]


def test_the_wait_runs_out_with_503_and_the_line_is_left_clean() -> None:
    async def main() -> None:
        adm = Admission(max_requests=1, max_bytes=10**9, wait_s=0.05, max_waiting=10)
        ticket = await adm.admit(None)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(Overloaded) as info:
            await adm.admit(None)
        assert 0.04 <= loop.time() - t0 < 1 and info.value.headers == {"Retry-After": "1"}
        assert not adm.waiters and adm.requests == 1
        ticket.release()
        assert adm.requests == 0
        (await adm.admit(None)).release()

    run(main())


def test_a_full_line_and_a_zero_wait_refuse_at_once() -> None:
    async def main() -> None:
        adm = Admission(max_requests=1, max_bytes=10**9, wait_s=5, max_waiting=1)
        ticket = await adm.admit(None)
        waiting = asyncio.create_task(adm.admit(None))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await asyncio.wait_for(adm.admit(None), 0.5)
        ticket.release()
        (await waiting).release()
        assert adm.requests == 0

        no_wait = Admission(max_requests=1, max_bytes=10**9, wait_s=0, max_waiting=10)
        held = await no_wait.admit(None)
        with pytest.raises(Overloaded):
            await asyncio.wait_for(no_wait.admit(None), 0.5)
        held.release()

    run(main())


def test_a_cancelled_waiter_gives_back_its_place_and_a_slot_handed_to_it() -> None:
    async def main() -> None:
        adm = Admission(max_requests=1, max_bytes=10**9, wait_s=5, max_waiting=10)
        ticket = await adm.admit(None)
        first = asyncio.create_task(adm.admit(None))
        second = asyncio.create_task(adm.admit(None))
        await asyncio.sleep(0)
        first.cancel()                      # left the line before a slot came
        await asyncio.sleep(0)
        assert len(adm.waiters) == 1
        ticket.release()                    # the slot goes to the second waiter
        second_ticket = await second
        third = asyncio.create_task(adm.admit(None))
        await asyncio.sleep(0)
        second_ticket.release()             # handed to the third ...
        third.cancel()                      # ... which is cancelled before it runs: the slot comes back
        with pytest.raises(asyncio.CancelledError):
            await third
        assert adm.requests == 0 and not adm.waiters

    run(main())


def test_body_bytes_are_budgeted_and_released() -> None:
    async def main() -> None:
        adm = Admission(max_requests=10, max_bytes=1000, wait_s=0, max_waiting=0)
        a = await adm.admit(600)
        with pytest.raises(Overloaded):
            await adm.admit(600)             # the reservation fails: its slot is given back
        assert adm.requests == 1 and adm.bytes == 600
        b = await adm.admit(None)            # chunked: counted as it arrives
        b.grow(300)
        with pytest.raises(Overloaded):
            b.grow(200)
        a.release()
        b.release()
        b.release()                          # idempotent
        assert adm.requests == 0 and adm.bytes == 0

    run(main())
