"""``epwatch.hooks.patch``: the one-line patch on real gloo collectives (one rank, in this
process), phase inference, stacked levels, patching twice, unpatching, import orders."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from epwatch.cliargs import free_port
from epwatch.hooks import COMBINE, DISPATCH, Probe, get_probe
from epwatch.hooks.patch import patch_all_to_all
from epwatch.hooks.torch_a2a import EPAllToAll
from tests.hook_sink import FAST, FrameSink

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def sink(hook_sink: FrameSink) -> FrameSink:
    return hook_sink


@pytest.fixture
def probe(sink: FrameSink) -> Probe:
    p = get_probe("patch", 0, 1, socket_path=sink.path, **FAST)
    assert isinstance(p, Probe)
    return p


def positions(sink: FrameSink, n: int) -> list[tuple[int, int, int]]:
    recs = sink.wait_records(n)
    assert len(recs) == n, f"expected {n} records, got {len(recs)}"
    return list(zip(recs.step.tolist(), recs.layer.tolist(), recs.phase.tolist(), strict=True))


def fake_comm() -> types.SimpleNamespace:
    """A stand-in for ``deepspeed.comm``: its own names (``tensor``, extra keywords) and
    a call down to ``torch.distributed`` underneath, as DeepSpeed's TorchBackend does."""

    def all_to_all_single(
        output, tensor, output_split_sizes=None, input_split_sizes=None, group=None,
        async_op=False, prof=False, log_name="all_to_all_single", debug=None,
    ):  # type: ignore[no-untyped-def]  # fmt: skip
        assert log_name == "all_to_all_single"
        return dist.all_to_all_single(
            output=output, input=tensor, output_split_sizes=output_split_sizes,
            input_split_sizes=input_split_sizes, group=group, async_op=async_op,
        )  # fmt: skip

    return types.SimpleNamespace(__name__="fake_comm", all_to_all_single=all_to_all_single)


def test_payloads_alternate_and_aux_exchanges_join_the_dispatch(
    gloo: None, sink: FrameSink, probe: Probe
) -> None:
    """AutoEP's order (counts, dispatch, combine) and Megatron's (dispatch, probs,
    combine), two layers per step: four records per step, nothing for the aux calls."""
    patch = patch_all_to_all(dist, layers_per_step=2, probe=probe)
    try:
        for _ in range(2):
            counts = torch.empty(1, dtype=torch.int32)
            dist.all_to_all_single(counts, torch.tensor([6], dtype=torch.int32))  # layer 0
            dist.all_to_all_single(torch.empty(6, 4), torch.ones(6, 4), [6], [6])
            dist.all_to_all_single(torch.empty(6, 4), torch.ones(6, 4), [6], [6])
            dist.all_to_all_single(torch.empty(3, 4), torch.ones(3, 4))  # layer 1
            dist.all_to_all_single(torch.empty(3), torch.ones(3))  # routing weights
            dist.all_to_all_single(torch.empty(3, 4), torch.ones(3, 4))
        assert patch.calls == 12
    finally:
        patch.unpatch()
    assert positions(sink, 8) == [
        (s, layer, phase) for s in range(2) for layer in range(2) for phase in (0, 1)
    ]
    recs = sink.records()
    assert recs.send_bytes.tolist()[:4] == [96, 96, 48, 48]  # aux bytes are not payload
    assert recs.recv_tokens.tolist()[:4] == [6, 6, 3, 3]
    disp = recs.take(recs.phase == DISPATCH)
    # the Megatron-style dispatch lasts until its trailing weight exchange is done
    assert (disp.exit_ns >= disp.enter_ns).all()


def test_explicit_phase_layer_and_hints_win_and_never_reach_torch(
    gloo: None, sink: FrameSink, probe: Probe
) -> None:
    patch = patch_all_to_all(dist, probe=probe)
    try:
        out = torch.empty(4, 2)
        dist.all_to_all_single(out, torch.ones(4, 2), phase=DISPATCH, layer=5, step=9,
                               recv_tokens=7, dropped_tokens=3)  # fmt: skip
        assert torch.equal(out, torch.ones(4, 2))
        dist.all_to_all_single(out, torch.ones(4, 2), phase=COMBINE, layer=5, step=9)
        dist.all_to_all_single(torch.empty(4, 2), torch.ones(4, 2), count=False, phase=DISPATCH,
                               layer=6, step=9)  # fmt: skip
        dist.all_to_all_single(torch.empty(4, 2), torch.ones(4, 2), layer=6, step=9)
    finally:
        patch.unpatch()
    assert positions(sink, 3) == [(9, 5, 0), (9, 5, 1), (9, 6, 0)]
    recs = sink.records()
    assert recs.recv_tokens.tolist()[0] == 7 and recs.dropped_tokens.tolist() == [3, 0, 0]


def test_capacity_slabs_count_routed_rows_and_drops_follow_the_gate(
    gloo: None, sink: FrameSink, probe: Probe
) -> None:
    """[E, C, M] with zero padding: routed rows, not E; bytes are the whole slab."""
    patch = patch_all_to_all(dist, layers_per_step=1, probe=probe)
    try:
        slab = torch.zeros(2, 8, 4)
        slab[0, :5] = 1.0
        slab[1, :2] = 1.0
        patch.add_dropped(4)  # as a gate would, before its dispatch
        patch.add_dropped(1)
        dist.all_to_all_single(torch.empty_like(slab), slab)
        dist.all_to_all_single(torch.empty_like(slab), slab + 1)
    finally:
        patch.unpatch()
    recs = sink.wait_records(2)
    assert recs.recv_tokens.tolist() == [7, 0]  # a combine of slabs carries no tokens
    assert recs.send_bytes.tolist() == [256, 256]
    assert recs.dropped_tokens.tolist() == [5, 0]


def test_stacked_levels_count_once_and_deepspeed_names_pass_through(
    gloo: None, sink: FrameSink, probe: Probe
) -> None:
    comm = fake_comm()
    patch = patch_all_to_all(dist, aliases=[comm], probe=probe)
    try:
        assert comm.all_to_all_single.__wrapped__ is not None
        for _ in range(2):  # a dispatch, then a combine
            out, x = torch.empty(5, 3), torch.full((5, 3), 2.0)
            comm.all_to_all_single(out, tensor=x, log_name="all_to_all_single")
            assert torch.equal(out, x)
    finally:
        patch.unpatch()
    assert positions(sink, 2) == [(0, 0, 0), (0, 0, 1)]
    assert patch.calls == 2


def test_patching_twice_is_one_patch_and_unpatch_restores(
    gloo: None, sink: FrameSink, probe: Probe
) -> None:
    original = dist.all_to_all_single
    original_list = dist.all_to_all
    first = patch_all_to_all(dist, probe=probe)
    wrapper = dist.all_to_all_single
    second = patch_all_to_all(dist, layers_per_step=3)
    assert second is first and dist.all_to_all_single is wrapper
    dist.all_to_all_single(torch.empty(2, 2), torch.ones(2, 2))
    dist.all_to_all([torch.empty(2, 2)], [torch.ones(2, 2)])  # the list form: the combine
    first.unpatch()
    first.unpatch()  # harmless
    assert dist.all_to_all_single is original and dist.all_to_all is original_list
    dist.all_to_all_single(torch.empty(2, 2), torch.ones(2, 2))  # no longer counted
    assert positions(sink, 2) == [(0, 0, 0), (0, 0, 1)]
    third = patch_all_to_all(dist, probe=probe)
    assert third is not first
    third.unpatch()


def test_a_wrapper_over_ours_outlives_unpatch_and_passes_through(
    gloo: None, sink: FrameSink, probe: Probe
) -> None:
    original = dist.all_to_all_single
    patch = patch_all_to_all(dist, probe=probe)
    ours = dist.all_to_all_single
    seen: list[int] = []

    def theirs(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(1)
        return ours(*args, **kwargs)

    dist.all_to_all_single = theirs
    try:
        patch.unpatch()
        assert dist.all_to_all_single is theirs  # not ours to remove
        dist.all_to_all_single(torch.empty(2, 2), torch.ones(2, 2))
        assert seen == [1] and patch.calls == 0
    finally:
        dist.all_to_all_single = original


def test_adapter_inside_a_patch_neither_recurses_nor_counts_twice(
    gloo: None, sink: FrameSink, probe: Probe
) -> None:
    """The issue's first attempt: ``dist.all_to_all_single`` replaced by a function that
    calls EPAllToAll, which used to look the name up again."""
    original = dist.all_to_all_single
    a2a = EPAllToAll(probe=probe)

    def naive(output, input, *args, **kwargs):  # type: ignore[no-untyped-def]
        return a2a.all_to_all_single(output, input, *args, phase=DISPATCH, **kwargs)

    dist.all_to_all_single = naive
    try:
        late = EPAllToAll(probe=probe)  # built after the patch: still torch's function
        late.all_to_all_single(torch.empty(2, 2), torch.ones(2, 2), phase=COMBINE)
        dist.all_to_all_single(torch.empty(2, 2), torch.ones(2, 2))
    finally:
        dist.all_to_all_single = original
    assert len(sink.wait_records(2)) == 2


def test_async_payload_ends_on_wait(gloo: None, sink: FrameSink, probe: Probe) -> None:
    patch = patch_all_to_all(dist, probe=probe)
    try:
        work = dist.all_to_all_single(torch.empty(3, 2), torch.ones(3, 2), async_op=True)
        work.wait()
        work = dist.all_to_all_single(torch.empty(3, 2), torch.ones(3, 2), async_op=True)
        work.wait()
    finally:
        patch.unpatch()
    assert positions(sink, 2) == [(0, 0, 0), (0, 0, 1)]


def test_other_groups_pass_through(gloo: None, sink: FrameSink, probe: Probe) -> None:
    other = dist.new_group([0])
    patch = patch_all_to_all(dist, group=dist.group.WORLD, probe=probe)
    try:
        dist.all_to_all_single(torch.empty(2, 2), torch.ones(2, 2), group=other)
        dist.all_to_all_single(torch.empty(2, 2), torch.ones(2, 2))
    finally:
        patch.unpatch()
    assert patch.calls == 1


IMPORT_ORDERS = {
    # the library binds torch.distributed before epwatch patches it
    "library-first": "import fairscale.nn.moe.moe_layer as m\n"
    "from epwatch.hooks.patch import patch_all_to_all\n"
    "p = patch_all_to_all(dist, layers_per_step=1)\n",
    # epwatch patches before the library is imported
    "patch-first": "from epwatch.hooks.patch import patch_all_to_all\n"
    "p = patch_all_to_all(dist, layers_per_step=1)\n"
    "import fairscale.nn.moe.moe_layer as m\n",
    # an engine's own wrapper calling EPAllToAll, installed before epwatch is imported
    "wrapper-before-epwatch": "orig = dist.all_to_all_single\n"
    "def mine(o, i, *a, **k):\n"
    "    from epwatch.hooks.torch_a2a import EPAllToAll\n"
    "    return EPAllToAll().all_to_all_single(o, i, *a, phase=0, **k)\n"
    "dist.all_to_all_single = mine\n"
    "import fairscale.nn.moe.moe_layer as m\n"
    "from epwatch.hooks.patch import patch_all_to_all\n"
    "p = patch_all_to_all(dist, layers_per_step=1)\n",
}

SCRIPT = """
import os, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
{order}
x = torch.ones(1, 4, 3)
for _ in range(3):
    out = m._AllToAll.apply(dist.group.WORLD, x)
    assert torch.equal(out, x)
p.unpatch()
dist.destroy_process_group()  # gloo's threads must not outlive the interpreter
print("OK", sys.getrecursionlimit())
"""


@pytest.mark.parametrize("order", sorted(IMPORT_ORDERS))
def test_no_recursion_whatever_the_import_order(order: str, tmp_path: Path) -> None:
    code = SCRIPT.format(port=free_port(), order=IMPORT_ORDERS[order])
    env = {**os.environ, "EPWATCH_RANK": "0", "EPWATCH_WORLD_SIZE": "1",
           "EPWATCH_AGENT_SOCKET": str(tmp_path / "none.sock"), "OMP_NUM_THREADS": "1"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RecursionError" not in done.stderr and done.stdout.startswith("OK")


def test_a_bad_call_gets_torchs_own_error(gloo: None, sink: FrameSink, probe: Probe) -> None:
    bad_calls = (
        lambda: dist.all_to_all_single(torch.empty(2, 2), [1, 2]),  # not a tensor
        lambda: dist.all_to_all_single(torch.empty(3, 2), torch.ones(4, 2), [3], [9]),
    )

    def errors() -> list[type[BaseException]]:
        kinds = []
        for call in bad_calls:
            with pytest.raises(Exception) as info:
                call()
            kinds.append(type(info.value))
        return kinds

    unpatched = errors()
    patch = patch_all_to_all(dist, probe=probe)
    try:
        assert errors() == unpatched
    finally:
        patch.unpatch()
    assert probe.internal_errors == 0
