"""Which local rank drives which GPU.

Hooks report a rank's ``local_device`` (the CUDA/HIP device ordinal it uses), while
NVML and amdsmi number GPUs physically. They agree unless the serving processes see a
subset or a permutation through ``CUDA_VISIBLE_DEVICES`` (``HIP_VISIBLE_DEVICES``,
``ROCR_VISIBLE_DEVICES``): then local rank i runs on the i-th listed GPU. The mapping
is given the same way, as a comma list in local-rank order, of GPU indices or UUIDs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

_ENV_VARS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")


@dataclass(frozen=True)
class LocalRankMap:
    """GPU -> local rank. ``order`` None means the identity (GPU index = local rank)."""

    order: tuple[str, ...] | None = None

    def local_rank(self, index: int, uuid: str | None = None) -> int | None:
        """Local rank of physical GPU ``index`` (UUID used for UUID entries), or None."""
        if self.order is None:
            return index
        for rank, token in enumerate(self.order):
            if token.isdigit():
                if int(token) == index:
                    return rank
            elif uuid and uuid.lower().startswith(token.lower()):
                return rank  # CUDA accepts unique UUID prefixes too
        return None

    def describe(self) -> str:
        return "identity" if self.order is None else ",".join(self.order)


def parse_local_ranks(spec: str | None, environ: Mapping[str, str] | None = None) -> LocalRankMap:
    """Parse ``--gpu-local-ranks``.

    ``None``/``""``/``identity``: GPU index = local rank. ``env``: the first of
    CUDA_VISIBLE_DEVICES, HIP_VISIBLE_DEVICES, ROCR_VISIBLE_DEVICES that is set.
    Otherwise a list in local-rank order, e.g. ``4,5,6,7`` or ``GPU-8f6c...,GPU-12ab...``.
    """
    spec = (spec or "").strip()
    if spec in ("", "identity"):
        return LocalRankMap()
    if spec == "env":
        environ = os.environ if environ is None else environ
        for var in _ENV_VARS:
            value = environ.get(var)
            if value is not None:
                # CUDA's own rule: enumeration stops at the first invalid entry.
                tokens = []
                for token in _tokens(value):
                    if not _valid(token):
                        break
                    tokens.append(token)
                return LocalRankMap(tuple(tokens))
        return LocalRankMap()
    tokens = _tokens(spec)
    for token in tokens:
        if not _valid(token):
            raise ValueError(
                f"--gpu-local-ranks: {token!r} is neither a GPU index nor a GPU-/MIG- UUID"
            )
    return LocalRankMap(tuple(tokens))


def _tokens(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _valid(token: str) -> bool:
    return token.isdigit() or token.upper().startswith(("GPU-", "MIG-"))
