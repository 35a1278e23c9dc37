"""EP probes a serving engine calls around each dispatch/combine collective.

    from epwatch.hooks import get_probe, DISPATCH

    probe = get_probe(ep_group="decode-0", rank=r, world_size=p)
    token = probe.begin(step, layer, DISPATCH)
    out = all_to_all(...)                       # the engine's own collective
    probe.end(token, send_bytes=..., recv_bytes=..., recv_tokens=...)

This package imports without torch. The adapters for ``torch.distributed`` and DeepEP
live in :mod:`epwatch.hooks.torch_a2a` and :mod:`epwatch.hooks.deepep`, and the
one-line patch for libraries that call the all-to-all themselves (fairscale,
DeepSpeed, Megatron) in :mod:`epwatch.hooks.patch`; they import torch when they are
used. See docs/hooks.md.
"""

from epwatch.hooks.config import HookConfig, default_socket_path
from epwatch.hooks.layers import LayerCursor
from epwatch.hooks.probe import COMBINE, DISPATCH, NullProbe, Probe, Span
from epwatch.hooks.registry import flusher_of, get_probe, shutdown

__all__ = [
    "COMBINE",
    "DISPATCH",
    "HookConfig",
    "LayerCursor",
    "NullProbe",
    "Probe",
    "Span",
    "default_socket_path",
    "flusher_of",
    "get_probe",
    "shutdown",
]
