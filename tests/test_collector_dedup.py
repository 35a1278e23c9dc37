"""(agent_id, seq) de-duplication in bounded memory."""

from __future__ import annotations

from epwatch.collector.dedup import SeqDeduper


def test_in_order_resend_after_reconnect_is_duplicate() -> None:
    d = SeqDeduper(window=64)
    assert all(d.claim("a", s) for s in range(1, 11))
    # acks for 8..10 were lost; the agent resends them in order, then new ones
    assert [d.claim("a", s) for s in (8, 9, 10, 11, 12)] == [False, False, False, True, True]


def test_gaps_are_new_and_agents_are_independent() -> None:
    d = SeqDeduper(window=64)
    assert d.claim("a", 1) and d.claim("a", 5)  # 2..4 dropped by the agent
    assert d.claim("a", 3)  # reordered, never seen: new
    assert not d.claim("a", 3)
    assert d.claim("b", 3)


def test_release_makes_a_rejected_seq_new_again() -> None:
    d = SeqDeduper()
    assert d.claim("a", 1)
    d.release("a", 1)
    assert d.claim("a", 1)


def test_memory_is_bounded() -> None:
    d = SeqDeduper(window=16, max_agents=3)
    for s in range(1, 10_000):
        d.claim("a", s)
    assert not d.claim("a", 5)  # far below the window: treated as seen
    assert len(d._agents["a"].recent) <= 2 * 16 + 1
    for agent in "bcde":
        d.claim(agent, 1)
    assert len(d) == 3
