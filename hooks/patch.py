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
while another patched call is running (``deepspeed.comm`` calls torch's function
underneath) goes straight through, so stacked levels count once. Patching a module
again returns the patch already on it.

The library does not say which collective is the dispatch and which the combine, so
the patch infers it: payloads (tensors of two or more dims) alternate dispatch,
combine, dispatch, ... through the layers; auxiliary exchanges (1-D tensors such as
count or split-size vectors and routing weights, ``count=False``, or at most
``aux_max_elements`` elements) move no tokens: one that precedes a dispatch payload
opens its span (DeepSpeed AutoEP's count exchange, where a late rank's wait shows),
one between a dispatch and its combine (Megatron's routing probabilities) is not
timed. Keywords ``phase=``, ``layer=``, ``step=``, ``count=``, ``recv_tokens=`` and
``dropped_tokens=`` on a patched call override the inference and are removed before
the original sees the call.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

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


class _Inside:
    """Set while a patched call runs: nested patched calls (``deepspeed.comm`` calling
    torch's function) pass through. Not per thread: a thread-local costs ~100 ns a call,
    and one thread issues a group's all-to-alls (the phase state assumes it anyway); a
    call from another thread while one is in flight goes through untimed."""

    active = False


_inside = _Inside()


def patched_by(fn: Any) -> AllToAllPatch | None:
    """The active patch whose wrapper ``fn`` is, if any."""
    patch = getattr(fn, PATCH_ATTR, None)
    return patch if patch is not None and patch.active else None


class AllToAllPatch:
    """Wrappers on one or more modules, one probe, one phase state and one position.

    The per-call path is one method with the probe, clock test and counters resolved
    once: the record is all it allocates."""

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
        self.layers_per_step = layers_per_step
        self.group = group
        self.ep_group = ep_group
        self.capacity_layout = capacity_layout
        self.aux_max_elements = aux_max_elements
        self.active = True
        self.calls = 0  # collectives instrumented
        self._installed: list[tuple[Any, str, Callable[..., Any], Callable[..., Any]]] = []
        self._probe: Probe | NullProbe | None = None
        self._capturing: Callable[[], bool] | None = None
        self._fast = False  # see _can_be_fast
        if probe is not None:
            self._use(probe)
        # Phases alternate; a dispatch takes the next layer, its combine the same one.
        self._next = DISPATCH
        self.step = 0
        self._layer = 0
        self._next_layer = 0
        # (token, step, layer) of a dispatch an auxiliary exchange opened.
        self._open: tuple[Token | None, int, int] | None = None
        self._dropped = 0

    # ---- set-up -----------------------------------------------------------------------

    def _use(self, probe: Probe | NullProbe) -> Probe | NullProbe:
        self._probe = probe
        self._capturing = capture_check(probe)
        self._fast = self._can_be_fast()
        return probe

    def _can_be_fast(self) -> bool:
        """Whether a plain call of a payload may skip the checks that hold for the
        patch's life (the per-call ones remain: nesting, shape, graph capture)."""
        return (
            self.active
            and self._probe is not None
            and self._probe.enabled
            and self.group is None
            and self.aux_max_elements <= 0
        )

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
            wrap = _wrap_single if name == "all_to_all_single" else _wrap_list
            wrapper = wrap(self, original)
            setattr(module, name, wrapper)
            self._installed.append((module, name, original, wrapper))

    def unpatch(self) -> None:
        """Put the originals back (a wrapper someone else wrapped over stays, and passes
        straight through from now on)."""
        with _lock:
            if not self.active:
                return
            self.active = self._fast = False
            for module, name, original, wrapper in reversed(self._installed):
                if getattr(module, name, None) is wrapper:
                    setattr(module, name, original)
            self._installed.clear()

    @property
    def modules(self) -> list[Any]:
        seen: list[Any] = []
        for module, *_ in self._installed:
            if not any(module is m for m in seen):
                seen.append(module)
        return seen

    # ---- what the engine may tell us --------------------------------------------------

    def next_step(self, step: int | None = None) -> int:
        """Start a forward pass (needed when ``layers_per_step`` was not given)."""
        self.step = self.step + 1 if step is None else step
        self._next_layer = 0
        self._next = DISPATCH
        self._open = None
        return self.step

    def add_dropped(self, tokens: int) -> None:
        """Routed slots for this rank's experts that a capacity limit dropped, carried
        by the next dispatch: a gate knows (it runs before the dispatch), the
        collective does not."""
        self._dropped += int(tokens)

    # ---- the wrappers' work -----------------------------------------------------------

    def _mine(self, group: Any) -> bool:
        mine = self.group
        return mine is None or group is mine or (group is None and mine is dist.group.WORLD)

    def slow(
        self,
        original: Callable[..., Any],
        output: Any,
        input: Any,
        output_split_sizes: Any,
        input_split_sizes: Any,
        group: Any,
        async_op: bool,
        kw: dict[str, Any],
    ) -> Any:
        """Every call the wrapper's fast path does not take: keywords (hints, or a
        library's own such as DeepSpeed's ``tensor=``, ``log_name=``), auxiliary
        exchanges, the list form, other groups, nested or unpatched calls."""
        hints = _pop_hints(kw) if kw else None
        lists = output_split_sizes is _LISTS
        if input is None and "tensor" in kw:  # deepspeed.comm names its input `tensor`
            input = kw.pop("tensor")
        args = (output, input) if lists else (output, input, output_split_sizes, input_split_sizes)
        if _inside.active or not self.active or (self.group is not None and not self._mine(group)):
            return original(*args, group=group, async_op=async_op, **kw)
        probe = self._probe
        if probe is None:
            probe = self._resolve_probe(group)
        capturing = self._capturing
        if not probe.enabled or (capturing is not None and capturing()):
            return original(*args, group=group, async_op=async_op, **kw)
        if lists:
            output, input = _Stacked(output), _Stacked(input)
            output_split_sizes = input_split_sizes = None
        phase = self._next
        try:
            if hints is None:
                aux = input.ndim < 2 or 0 < input.numel() <= self.aux_max_elements
            else:
                aux, phase = _aux_and_phase(hints, input, self.aux_max_elements, phase)
        except Exception:  # not tensors: the original says what is wrong with them
            return original(*args, group=group, async_op=async_op, **kw)
        if aux:
            return self._aux(original, args, group, async_op, kw, hints, probe, phase)
        return self.payload(
            probe, original, output, input, output_split_sizes, input_split_sizes, group,
            async_op, phase, hints, (args, kw),
        )  # fmt: skip

    def payload(
        self,
        probe: Probe | NullProbe,
        original: Callable[..., Any],
        output: Any,
        input: Any,
        output_split_sizes: Any,
        input_split_sizes: Any,
        group: Any,
        async_op: bool,
        phase: int,
        hints: dict[str, Any] | None = None,
        call_as: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
    ) -> Any:
        """Time one dispatch or combine payload. ``call_as``: the arguments the
        original gets when they are not the four plain ones."""
        if phase == DISPATCH and self._open is not None:
            token, step, layer = self._open
            self._open = None
        else:
            if hints is not None:
                step, layer = self._position(phase, hints)
            elif phase == DISPATCH:  # _position(), inlined for the common case
                step, layer = self.step, self._next_layer
                self._layer, self._next_layer = layer, layer + 1
            else:
                step, layer = self.step, self._layer
                if self.layers_per_step is not None and layer + 1 >= self.layers_per_step:
                    self.step, self._next_layer = step + 1, 0
            token = probe.begin(step, layer, phase)
        _inside.active = True
        try:
            if call_as is None:
                work = original(
                    output, input, output_split_sizes, input_split_sizes, group=group,
                    async_op=async_op,
                )  # fmt: skip
            else:
                work = original(*call_as[0], group=group, async_op=async_op, **call_as[1])
        finally:
            _inside.active = False
        self.calls += 1
        self._next = COMBINE if phase == DISPATCH else DISPATCH
        try:
            tokens = None if hints is None else hints.get("recv_tokens")
            if tokens is None and type(output_split_sizes) is list:
                # counts(), inlined for the common case (a dropless dispatch or combine)
                send, recv, tokens = input.nbytes, output.nbytes, sum(output_split_sizes)
            else:
                send, recv, tokens = counts(
                    output, input, output_split_sizes, input_split_sizes, phase,
                    self.capacity_layout, tokens,
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
        except Exception:
            probe.count_error()
            return work
        if async_op:
            rest = (send, recv, tokens, None, peers, dropped)  # fmt: skip
            return TimedWork(work, lambda: probe.end(token, *rest))
        probe.end(token, send, recv, tokens, None, peers, dropped)
        return work

    def _position(self, phase: int, hints: dict[str, Any] | None) -> tuple[int, int]:
        """(step, layer) of a payload: a dispatch takes the next layer, its combine the
        same; after the last layer's combine the step advances."""
        layer = step = None
        if hints is not None:
            layer, step = hints.get("layer"), hints.get("step")
        if phase == DISPATCH:
            if layer is None:
                layer = self._next_layer
            self._layer, self._next_layer = layer, layer + 1
            return (self.step if step is None else step), layer
        if layer is None:
            layer = self._layer
        here = self.step if step is None else step
        last = self.layers_per_step
        if last is not None and layer + 1 >= last:
            self.step += 1
            self._next_layer = 0
        return here, layer

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
        """A count, split-size or weight exchange. Before a dispatch it opens the
        dispatch (a late rank's wait shows up there, not as expert compute); between a
        dispatch and its combine it is not timed."""
        if phase == DISPATCH and self._open is None:
            step, layer = self._position(DISPATCH, hints)
            self._open = (probe.begin(step, layer, DISPATCH), step, layer)
        _inside.active = True
        try:
            work = original(*args, group=group, async_op=async_op, **kw)
        finally:
            _inside.active = False
        self.calls += 1
        return work

    def __repr__(self) -> str:
        where = ", ".join(getattr(m, "__name__", type(m).__name__) for m in self.modules)
        return f"AllToAllPatch([{where}], active={self.active}, probe={self._probe!r})"


def _aux_and_phase(
    hints: dict[str, Any], input: Any, aux_max_elements: int, phase: int
) -> tuple[bool, int]:
    count = hints.get("count")
    if count is None:
        aux = input.ndim < 2 or (aux_max_elements > 0 and input.numel() <= aux_max_elements)
    else:
        aux = not count
    explicit = hints.get("phase")
    return aux, (phase if explicit is None else int(explicit))


# Marks a call of the list form (``all_to_all(outputs, inputs)``) in ``single``.
_LISTS: Any = object()


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


def _mark(wrapper: Callable[..., Any], original: Callable[..., Any], patch: AllToAllPatch) -> Any:
    functools.update_wrapper(wrapper, original)
    setattr(wrapper, ORIGINAL_ATTR, original)
    setattr(wrapper, PATCH_ATTR, patch)
    return wrapper


def _wrap_single(patch: AllToAllPatch, original: Callable[..., Any]) -> Callable[..., Any]:
    """The replacement of ``original``: the common call (a payload of this group, no
    keywords) goes straight to :meth:`AllToAllPatch.payload`; everything else takes
    :meth:`AllToAllPatch.slow`. Positional names suit torch (``input``) and
    deepspeed.comm (``tensor``) alike."""
    slow, payload = patch.slow, patch.payload

    def all_to_all_single(  # type: ignore[no-untyped-def]
        output, input=None, output_split_sizes=None, input_split_sizes=None, group=None,
        async_op=False, **kw,
    ):  # fmt: skip
        capturing = patch._capturing  # None for the host clock
        try:
            plain = (
                not kw
                and patch._fast
                and not _inside.active
                and input.ndim >= 2
                and (capturing is None or not capturing())
            )
        except Exception:  # not a tensor: the original says what is wrong with it
            plain = False
        if not plain:
            return slow(
                original, output, input, output_split_sizes, input_split_sizes, group,
                async_op, kw,
            )  # fmt: skip
        return payload(
            patch._probe, original, output, input, output_split_sizes, input_split_sizes,
            group, async_op, patch._next,
        )  # fmt: skip

    return _mark(all_to_all_single, original, patch)


def _wrap_list(patch: AllToAllPatch, original: Callable[..., Any]) -> Callable[..., Any]:
    slow = patch.slow

    def all_to_all(output_tensor_list, input_tensor_list, group=None, async_op=False, **kw):  # type: ignore[no-untyped-def]
        return slow(
            original, output_tensor_list, input_tensor_list, _LISTS, _LISTS, group, async_op, kw
        )

    return _mark(all_to_all, original, patch)


def patch_all_to_all(
    target: ModuleType | Any = None, *, aliases: Iterable[Any] = (), **settings: Any
) -> AllToAllPatch:
    """Instrument every all-to-all called through ``target`` (default
    ``torch.distributed``) and ``aliases``. ``settings`` are :class:`AllToAllPatch`'s:

    - ``layers_per_step``: MoE layers per forward pass (the step advances after the
      last combine; otherwise call ``patch.next_step()``);
    - ``group``: only calls on this process group are timed (default: all);
    - ``probe``: default, the registry's probe for this rank of the first call's group
      (``EPWATCH_*`` settings, ``ep_group=``);
    - ``capacity_layout``: count routed rows of ``[E, C, M]`` slabs (default: detected);
    - ``aux_max_elements``: payload-shaped tensors this small are auxiliary exchanges.

    A module some active patch already covers keeps it; that patch is returned (its
    settings unchanged) and takes on the new aliases."""
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
        patch = existing or AllToAllPatch(**settings)
        for module in modules:
            patch.install(module)
    if existing is None:
        log.info("epwatch: all-to-all instrumented on %s", ", ".join(map(_name, modules)))
    return patch


def _name(module: Any) -> str:
    return str(getattr(module, "__name__", type(module).__name__))
