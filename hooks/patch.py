"""Instrument a library that calls the all-to-all itself, in one line.

    import torch.distributed as dist
    from epwatch.hooks.patch import patch_all_to_all

    patch = patch_all_to_all(dist, layers_per_step=num_moe_layers)
    ...                                   # fairscale, DeepSpeed, Megatron run unchanged
    patch.unpatch()

``all_to_all_single`` and ``all_to_all`` on the target module (and on every alias:
``deepspeed.comm``, a library module that did ``from torch.distributed import
all_to_all_single``) are replaced by wrappers that call the function they replaced,
captured once: a wrapper never looks its own name up, so it cannot recurse. A call made
while another patched call is running on the same thread (``deepspeed.comm`` calls
torch's function underneath) goes straight through, so stacked levels count once.
Patching a module again returns the patch already on it.

The library does not say which collective is the dispatch and which the combine, so
the patch infers it: payloads (tensors of two or more dims) alternate dispatch,
combine, dispatch, ... through the layers; auxiliary exchanges (1-D tensors such as
count or split-size vectors and routing weights, ``count=False``, or at most
``aux_max_elements`` elements) move no tokens and join the dispatch: one that precedes
a dispatch payload opens its span (DeepSpeed AutoEP's count exchange), one right after
it extends it (Megatron's probabilities). The dispatch record is queued when the next
payload starts. Keywords ``phase=``, ``layer=``, ``step=``, ``count=``,
``recv_tokens=`` and ``dropped_tokens=`` on a patched call override the inference and
are removed before the original sees the call.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

from epwatch.hooks.layers import LayerCursor
from epwatch.hooks.probe import COMBINE, DISPATCH, NullProbe, Probe, Token
from epwatch.hooks.registry import get_probe
from epwatch.hooks.torch_a2a import (
    ORIGINAL_ATTR,
    TimedWork,
    capture_check,
    counts,
    peer_send_bytes,
)

log = logging.getLogger("epwatch.hooks")

NAMES = ("all_to_all_single", "all_to_all")
PATCH_ATTR = "__epwatch_patch__"
_HINTS = ("phase", "layer", "step", "count", "recv_tokens", "dropped_tokens")
_lock = threading.Lock()


class _Inside(threading.local):
    """Set while a patched call runs on this thread: nested patched calls pass through."""

    active = False


_inside = _Inside()


def patched_by(fn: Any) -> AllToAllPatch | None:
    """The active patch whose wrapper ``fn`` is, if any."""
    patch = getattr(fn, PATCH_ATTR, None)
    return patch if patch is not None and patch.active else None


class AllToAllPatch:
    """Wrappers on one or more modules, one probe, one layer cursor, one phase state."""

    def __init__(
        self,
        *,
        layers_per_step: int | None = None,
        group: Any = None,
        probe: Probe | NullProbe | None = None,
        ep_group: str | None = None,
        capacity_layout: bool | None = None,
        aux_max_elements: int = 0,
    ) -> None:
        self.cursor = LayerCursor(layers_per_step=layers_per_step)
        self.group = group
        self.ep_group = ep_group
        self.capacity_layout = capacity_layout
        self.aux_max_elements = aux_max_elements
        self.active = True
        self.calls = 0  # collectives instrumented
        self._installed: list[tuple[Any, str, Callable[..., Any], Callable[..., Any]]] = []
        self._probe: Probe | NullProbe | None = None
        self._capturing: Callable[[], bool] | None = None
        self._now: Callable[[], Any] = _never_called
        if probe is not None:
            self._use(probe)
        self._next = DISPATCH
        # (token, step, layer, phase) of a span an auxiliary exchange opened.
        self._open: tuple[Token, int, int, int] | None = None
        # A finished dispatch waiting for trailing auxiliary calls:
        # [token, exit stamp, send, recv, tokens, peers, dropped].
        self._pending: list[Any] | None = None
        self._dropped = 0

    # ---- set-up -----------------------------------------------------------------------

    def _use(self, probe: Probe | NullProbe) -> Probe | NullProbe:
        self._probe = probe
        self._capturing = capture_check(probe)
        self._now = probe.clock.now
        return probe

    @property
    def probe(self) -> Probe | NullProbe | None:
        """Given, or the registry's for the first instrumented call's group."""
        return self._probe

    def _resolve_probe(self, group: Any) -> Probe | NullProbe:
        try:
            probe = get_probe(
                self.ep_group,
                rank=dist.get_rank(group),
                world_size=dist.get_world_size(group),
            )
        except Exception as e:
            probe = NullProbe(f"no rank from the process group: {e}")
        return self._use(probe)

    def install(self, module: Any) -> None:
        """Wrap the collectives ``module`` has; ones already wrapped by an active patch
        are left alone."""
        for name in NAMES:
            original = getattr(module, name, None)
            if original is None or not callable(original) or patched_by(original):
                continue
            wrapper = (_wrap_single if name == "all_to_all_single" else _wrap_list)(self, original)
            setattr(module, name, wrapper)
            self._installed.append((module, name, original, wrapper))

    def unpatch(self) -> None:
        """Put the originals back (a wrapper someone else wrapped over stays, and passes
        straight through from now on); queue a dispatch still waiting."""
        with _lock:
            if not self.active:
                return
            self.active = False
            self._flush()
            for module, name, original, wrapper in reversed(self._installed):
                if getattr(module, name, None) is wrapper:
                    setattr(module, name, original)
            self._installed.clear()

    @property
    def modules(self) -> list[Any]:
        return list(dict.fromkeys(m for m, *_ in self._installed))

    # ---- what the engine may tell us --------------------------------------------------

    def next_step(self, step: int | None = None) -> int:
        """Start a forward pass when ``layers_per_step`` was not given."""
        self._flush()
        self._open = None
        self._next = DISPATCH
        return self.cursor.next_step(step)

    def add_dropped(self, tokens: int) -> None:
        """Routed slots for this rank's experts that a capacity limit dropped in the
        current (or, before it starts, the next) dispatch: a gate knows, the
        collective does not."""
        pending = self._pending
        if pending is not None:
            pending[6] += int(tokens)
        else:
            self._dropped += int(tokens)

    # ---- the wrappers' work -----------------------------------------------------------

    def _mine(self, group: Any) -> bool:
        mine = self.group
        return mine is None or group is mine or (group is None and mine is dist.group.WORLD)

    def single(
        self,
        original: Callable[..., Any],
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: Any,
        input_split_sizes: Any,
        group: Any,
        async_op: bool,
        kw: dict[str, Any],
    ) -> Any:
        hints = _pop_hints(kw) if kw else None
        if _inside.active or not self.active or (self.group is not None and not self._mine(group)):
            return original(
                output, input, output_split_sizes, input_split_sizes,
                group=group, async_op=async_op, **kw,
            )  # fmt: skip
        _inside.active = True
        try:
            return self._call(
                original, (output, input, output_split_sizes, input_split_sizes), group,
                async_op, kw, hints, output, input, output_split_sizes, input_split_sizes,
            )  # fmt: skip
        finally:
            _inside.active = False

    def lists(
        self,
        original: Callable[..., Any],
        outputs: list[torch.Tensor],
        inputs: list[torch.Tensor],
        group: Any,
        async_op: bool,
        kw: dict[str, Any],
    ) -> Any:
        hints = _pop_hints(kw) if kw else None
        if _inside.active or not self.active or (self.group is not None and not self._mine(group)):
            return original(outputs, inputs, group=group, async_op=async_op, **kw)
        _inside.active = True
        try:
            return self._call(
                original, (outputs, inputs), group, async_op, kw, hints,
                _Stacked(outputs), _Stacked(inputs), None, None,
            )  # fmt: skip
        finally:
            _inside.active = False

    def _call(
        self,
        original: Callable[..., Any],
        args: tuple[Any, ...],
        group: Any,
        async_op: bool,
        kw: dict[str, Any],
        hints: dict[str, Any] | None,
        output: Any,
        input: Any,
        output_split_sizes: Any,
        input_split_sizes: Any,
    ) -> Any:
        probe = self._probe
        if probe is None:
            probe = self._resolve_probe(group)
        capturing = self._capturing
        if not probe.enabled or (capturing is not None and capturing()):
            return original(*args, group=group, async_op=async_op, **kw)
        count = None if hints is None else hints.get("count")
        aux = count is False or (
            count is None and (input.ndim < 2 or input.numel() <= self.aux_max_elements)
        )
        phase = self._next if hints is None or hints.get("phase") is None else hints["phase"]
        if aux:
            return self._aux(original, args, group, async_op, kw, hints, probe, phase)
        token, step, layer = self._start(probe, phase, hints)
        work = original(*args, group=group, async_op=async_op, **kw)
        self.calls += 1
        self._next = COMBINE if phase == DISPATCH else DISPATCH
        try:
            counts = self._counts(
                probe, phase, step, layer, hints, output, input,
                output_split_sizes, input_split_sizes,
            )  # fmt: skip
        except Exception:
            probe.count_error()
            return work
        if phase == DISPATCH:
            if async_op:
                return TimedWork(work, lambda: self._hold(token, counts))
            self._hold(token, counts)
        elif async_op:
            return TimedWork(work, lambda: probe.end(token, *counts))
        else:
            probe.end(token, *counts)
        return work

    def _aux(
        self,
        original: Callable[..., Any],
        args: tuple[Any, ...],
        group: Any,
        async_op: bool,
        kw: dict[str, Any],
        hints: dict[str, Any] | None,
        probe: Probe | NullProbe,
        phase: int,
    ) -> Any:
        """A count, split-size or weight exchange: part of the dispatch around it."""
        pending = self._pending
        if pending is None and self._open is None:
            token, step, layer = self._start(probe, phase, hints)
            self._open = (token, step, layer, phase)
        work = original(*args, group=group, async_op=async_op, **kw)
        self.calls += 1
        if pending is not None:  # trailing: the dispatch lasts until this one is done
            if async_op:
                return TimedWork(work, lambda: pending.__setitem__(1, self._now()))
            pending[1] = self._now()
        return work

    def _start(
        self,
        probe: Probe | NullProbe,
        phase: int,
        hints: dict[str, Any] | None,
    ) -> tuple[Token | None, int, int]:
        """The token of the span this call belongs to: one an auxiliary exchange opened,
        or a new one; a dispatch still waiting is queued first."""
        if self._pending is not None:
            self._flush()
        opened = self._open
        if opened is not None:
            self._open = None
            if opened[3] == phase:
                return opened[0], opened[1], opened[2]
        layer = step = None
        if hints is not None:
            layer, step = hints.get("layer"), hints.get("step")
        try:
            pos = self.cursor.dispatch(layer) if phase == DISPATCH else self.cursor.combine(layer)
        except Exception:
            probe.count_error()
            pos = (self.cursor.step, layer or 0)
        s = pos[0] if step is None else step
        return probe.begin(s, pos[1], phase), s, pos[1]

    def _counts(
        self,
        probe: Probe | NullProbe,
        phase: int,
        step: int,
        layer: int,
        hints: dict[str, Any] | None,
        output: Any,
        input: Any,
        output_split_sizes: Any,
        input_split_sizes: Any,
    ) -> tuple[Any, ...]:
        """(send, recv, recv_tokens, peer wait, peer send, dropped) for probe.end."""
        send, recv, tokens = counts(
            output, input, output_split_sizes, input_split_sizes, phase, self.capacity_layout,
            None if hints is None else hints.get("recv_tokens"),
        )  # fmt: skip
        dropped = 0
        if phase == DISPATCH:
            dropped, self._dropped = self._dropped, 0
            if hints is not None:
                dropped += int(hints.get("dropped_tokens") or 0)
        every = probe.peer_sample_steps
        peers = None
        if every > 0 and not step % every and probe.sample_peers(step, layer):
            peers = (
                input.peer_bytes
                if type(input) is _Stacked
                else peer_send_bytes(input, input_split_sizes, probe.world_size)
            )
        return send, recv, tokens, None, peers, dropped

    def _hold(self, token: Token | None, counts: tuple[Any, ...]) -> None:
        """Keep a finished dispatch until the next payload: trailing exchanges and drops
        the gate reports afterwards still belong to it."""
        self._pending = [token, self._now(), *counts[:3], counts[4], counts[5]]

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and self._probe is not None:
            token, exit_stamp, send, recv, tokens, peers, dropped = pending
            self._probe.end_at(token, exit_stamp, send, recv, tokens, None, peers, dropped)

    def __repr__(self) -> str:
        where = ", ".join(getattr(m, "__name__", type(m).__name__) for m in self.modules)
        return f"AllToAllPatch([{where}], active={self.active}, probe={self._probe!r})"


class _Stacked:
    """The list form of ``all_to_all`` seen as one tensor of its rows, for counting
    (never a capacity slab; per-peer bytes are exact)."""

    __slots__ = ("elements", "nbytes", "ndim", "peer_bytes", "shape")

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.shape = (sum(t.shape[0] if t.ndim else 1 for t in tensors),)
        self.peer_bytes = [t.nbytes for t in tensors]
        self.nbytes = sum(self.peer_bytes)
        self.elements = sum(t.numel() for t in tensors)
        self.ndim = min(max((t.ndim for t in tensors), default=1), 2)

    def numel(self) -> int:
        return self.elements


def _never_called() -> Any:
    raise RuntimeError("no probe yet")


def _pop_hints(kw: dict[str, Any]) -> dict[str, Any] | None:
    hints = {name: kw.pop(name) for name in _HINTS if name in kw}
    return hints or None


def _input_name(original: Callable[..., Any]) -> str:
    """What the function calls its input: torch says ``input``, deepspeed.comm
    ``tensor``."""
    try:
        names = list(inspect.signature(original).parameters)
    except (TypeError, ValueError):
        return "input"
    return names[1] if len(names) > 1 and names[1] in ("input", "tensor") else "input"


def _mark(wrapper: Callable[..., Any], original: Callable[..., Any], patch: AllToAllPatch) -> Any:
    functools.update_wrapper(wrapper, original)
    setattr(wrapper, ORIGINAL_ATTR, original)
    setattr(wrapper, PATCH_ATTR, patch)
    return wrapper


def _wrap_single(patch: AllToAllPatch, original: Callable[..., Any]) -> Callable[..., Any]:
    single = patch.single
    if _input_name(original) == "tensor":

        def all_to_all_single(  # deepspeed.comm's names
            output, tensor, output_split_sizes=None, input_split_sizes=None, group=None,
            async_op=False, **kw,
        ):  # type: ignore[no-untyped-def]  # fmt: skip
            return single(
                original, output, tensor, output_split_sizes, input_split_sizes, group,
                async_op, kw,
            )  # fmt: skip

    else:

        def all_to_all_single(  # type: ignore[misc]
            output, input, output_split_sizes=None, input_split_sizes=None, group=None,
            async_op=False, **kw,
        ):  # type: ignore[no-untyped-def]  # fmt: skip
            return single(
                original, output, input, output_split_sizes, input_split_sizes, group,
                async_op, kw,
            )  # fmt: skip

    return _mark(all_to_all_single, original, patch)


def _wrap_list(patch: AllToAllPatch, original: Callable[..., Any]) -> Callable[..., Any]:
    lists = patch.lists

    def all_to_all(output_tensor_list, input_tensor_list, group=None, async_op=False, **kw):  # type: ignore[no-untyped-def]
        return lists(original, output_tensor_list, input_tensor_list, group, async_op, kw)

    return _mark(all_to_all, original, patch)


def patch_all_to_all(
    target: ModuleType | Any = None,
    *,
    aliases: Iterable[Any] = (),
    layers_per_step: int | None = None,
    group: Any = None,
    probe: Probe | NullProbe | None = None,
    ep_group: str | None = None,
    capacity_layout: bool | None = None,
    aux_max_elements: int = 0,
) -> AllToAllPatch:
    """Instrument every all-to-all called through ``target`` (default
    ``torch.distributed``) and ``aliases``.

    ``layers_per_step``: MoE layers per forward pass (the step advances after the last
    combine; otherwise call ``patch.next_step()``). ``group``: only calls on this
    process group are timed (default: all). ``probe``: default, the registry's probe
    for this rank of the first call's group (``EPWATCH_*`` settings, ``ep_group``).
    ``capacity_layout``: count routed rows of ``[E, C, M]`` slabs (default: detected).
    ``aux_max_elements``: payload-shaped tensors this small are auxiliary exchanges.
    A module some active patch already covers keeps it; that patch is returned (and
    takes on the new aliases)."""
    modules = [dist if target is None else target, *aliases]
    with _lock:
        existing = next(
            (
                p
                for m in modules
                for name in NAMES
                if (p := patched_by(getattr(m, name, None))) is not None
            ),
            None,
        )
        patch = existing or AllToAllPatch(
            layers_per_step=layers_per_step,
            group=group,
            probe=probe,
            ep_group=ep_group,
            capacity_layout=capacity_layout,
            aux_max_elements=aux_max_elements,
        )
        for module in modules:
            patch.install(module)
    if existing is None:
        log.info("epwatch: all-to-all instrumented on %s", ", ".join(map(_name, modules)))
    return patch


def _name(module: Any) -> str:
    return str(getattr(module, "__name__", type(module).__name__))
