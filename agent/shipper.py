"""Ship the spool to the collector over one long gRPC stream, at least once.

Messages go out in seq order with up to ``window`` in flight; each ``Ack`` removes one
from the spool. When the stream breaks, everything unacknowledged is resent in order
on the next one (the collector de-duplicates by (agent_id, seq)). Reconnects back off
exponentially with jitter so a restarted collector is not hit by every agent at once.
The big batch bytes are serialized once, in the batcher; here only a small header
(agent_id, node, seq, current stats) is serialized and prepended, which protobuf
merges into one message.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import grpc

from epwatch.agent.split import HEADER_ROOM
from epwatch.agent.spool import Entry, Spool
from epwatch.protos import epwatch_pb2 as pb

log = logging.getLogger(__name__)

STREAM_METHOD = "/epwatch.v1.Collector/Stream"
MAX_MESSAGE_BYTES = 64 << 20
MAX_MESSAGE_METADATA = "epwatch-max-message-bytes"  # the collector's limit, in its headers
_TRANSPORT_LIMIT = re.compile(r"larger than max \(\d+ vs\. (\d+)\)")


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with 'equal jitter': half fixed, half random."""
    d = min(cap, base * (2 ** min(attempt, 30)))
    return d / 2 + rng.uniform(0, d / 2)


@dataclass(frozen=True)
class ClientSecurity:
    """How the agent proves itself to the collector: TLS against ``ca`` (PEM bytes),
    with a client certificate (``cert``/``key``, mTLS), and/or a bearer token.
    Empty: plaintext, the default for a collector on 127.0.0.1."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    token: bytes | None = None
    server_name: str | None = None  # the name to expect on the collector's certificate

    @property
    def tls(self) -> bool:
        return self.ca is not None

    def channel(self, target: str, options: list[tuple[str, object]]) -> grpc.Channel:
        if self.server_name:
            options = [*options, ("grpc.ssl_target_name_override", self.server_name)]
        if not self.tls:
            return grpc.insecure_channel(target, options=options)
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )
        return grpc.secure_channel(target, creds, options=options)

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        if self.token is None:
            return None
        return (("authorization", f"Bearer {self.token.decode()}"),)


class Shipper:
    """The sender thread and its connection state."""

    def __init__(
        self,
        target: str,
        agent_id: str,
        node: str,
        spool: Spool,
        stats: Callable[[], pb.AgentStats],
        *,
        window: int = 32,
        backoff_base: float = 0.1,
        backoff_max: float = 5.0,
        heartbeat_s: float = 2.0,
        ack_timeout_s: float = 30.0,
        connect_timeout_s: float = 2.0,
        security: ClientSecurity | None = None,
        split: Callable[[bytes, int], list[tuple[bytes, int]] | None] | None = None,
    ) -> None:
        self.target = target
        self.agent_id = agent_id
        self.node = node
        self._spool = spool
        self._stats = stats
        self._window = window
        self._backoff = (backoff_base, backoff_max)
        self._heartbeat_s = heartbeat_s
        self._ack_timeout_s = ack_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._security = security or ClientSecurity()
        self._split = split
        # The collector's --max-message-bytes, as it says when a stream opens (or as a
        # transport refusal reveals); larger messages are split before they are sent.
        self.max_message_bytes = MAX_MESSAGE_BYTES
        self._rng = random.Random()
        self._stop = threading.Event()
        self._call: grpc.Future | None = None
        self._thread = threading.Thread(target=self._run, name="shipper", daemon=True)
        self.connected = False
        self.reconnects = 0
        self.rejections = 0
        self.auth_failures = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, drain_timeout: float = 0.0) -> None:
        """Stop after the spool drains or ``drain_timeout`` passes."""
        if drain_timeout > 0 and self.connected:
            self._spool.wait_empty(drain_timeout)
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        self._spool.wake()
        self._thread.join(timeout=5)

    def _header(self, seq: int) -> bytes:
        msg = pb.AgentMessage(agent_id=self.agent_id, node=self.node, seq=seq, stats=self._stats())
        return msg.SerializeToString()

    def _requests(
        self, closed: threading.Event, taking: threading.Lock, limit_known: threading.Event
    ) -> Iterator[bytes]:
        """The stream's messages; sleeps in the spool until a message, a heartbeat or
        the ack-timeout check is due (no polling while the node is quiet)."""
        yield self._header(0)  # identifies the agent to the collector at once
        # Nothing else before the collector has said its message limit (it does so as
        # the stream opens; an older one does not, hence the timeout).
        limit_known.wait(self._connect_timeout_s)

        def cancelled() -> bool:
            return closed.is_set() or self._stop.is_set()

        last = time.monotonic()
        while not cancelled():
            with taking:  # the connection's end waits for this before it requeues
                if closed.is_set():
                    return
                due = min(last + self._heartbeat_s, self._ack_check_at(time.monotonic()))
                wait = max(0.0, due - time.monotonic())
                entry = self._spool.take(self._window, timeout=wait, cancelled=cancelled)
            now = time.monotonic()
            if entry is not None:
                header = self._header(entry.seq)
                if len(header) + len(entry.payload) > self.max_message_bytes:
                    self._too_large(entry)
                    continue
                yield header + entry.payload
                last = now
                continue
            if self._spool.oldest_inflight_age(now) > self._ack_timeout_s:
                log.warning("no ack for %.0f s; reconnecting", self._ack_timeout_s)
                call = self._call
                if call is not None:
                    call.cancel()
                return
            if now - last >= self._heartbeat_s:
                yield self._header(0)
                last = now

    def _too_large(self, entry: Entry) -> None:
        """Split a message the collector would refuse for its size, or drop it (counted
        by the spool as ``oversized``): resending it as it is would never succeed."""
        parts = self._split(entry.payload, self.max_message_bytes) if self._split else None
        log.warning(
            "message seq %d (%d bytes) exceeds the collector's limit of %d bytes: %s",
            entry.seq,
            len(entry.payload),
            self.max_message_bytes,
            f"split in {len(parts)}" if parts else "dropped",
        )
        self._spool.replace(entry, parts)

    def _ack_check_at(self, now: float) -> float:
        """When the oldest message in flight runs out of time for its ack."""
        age = self._spool.oldest_inflight_age(now)
        return now + self._ack_timeout_s - age + 0.01 if age else now + self._ack_timeout_s

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            if self._stream_once():
                attempt = 0
            if self._stop.is_set():
                break
            self.reconnects += 1
            delay = backoff_delay(attempt, *self._backoff, self._rng)
            attempt += 1
            self._stop.wait(delay)

    def _stream_once(self) -> bool:
        """One connection; True if it carried at least one ack."""
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", int(self._backoff[1] * 1000)),
            # BDP probing sizes the window for data we receive: here only small acks,
            # and each one cost a ping round trip (wake-ups on both ends)
            ("grpc.http2.bdp_probe", 0),
        ]
        channel = self._security.channel(self.target, options)
        closed = threading.Event()
        taking = threading.Lock()
        acked = False
        try:
            self._wait_ready(channel)
            stream = channel.stream_stream(STREAM_METHOD, response_deserializer=pb.Ack.FromString)
            limit_known = threading.Event()
            call = self._call = stream(
                self._requests(closed, taking, limit_known), metadata=self._security.metadata()
            )
            call.add_done_callback(lambda _: self._spool.wake())

            def learn() -> None:
                self._learn_limit(call.initial_metadata() or ())
                limit_known.set()

            threading.Thread(target=learn, name="shipper-headers", daemon=True).start()
            self.connected = True
            log.info("connected to collector %s", self.target)
            acks = iter(call)
            while True:
                # gRPC's blocking read wakes ten times a second while it waits, so wait
                # here, woken by the spool, until an ack is due or the call has ended.
                self._spool.wait_inflight(lambda: call.done() or self._stop.is_set())
                try:
                    ack = next(acks)
                except StopIteration:
                    break
                acked = True
                self._on_ack(ack)
        except grpc.FutureTimeoutError:
            log.debug("collector %s not reachable", self.target)
        except grpc.RpcError as exc:
            if not self._stop.is_set():
                self._stream_failed(exc)
        finally:
            closed.set()
            self._spool.wake()
            self.connected = False
            self._call = None
            with taking:
                self._spool.requeue()
            channel.close()
        return acked

    def _wait_ready(self, channel: grpc.Channel) -> None:
        """Like channel_ready_future().result(timeout), but stop() interrupts it."""
        ready = grpc.channel_ready_future(channel)
        deadline = time.monotonic() + self._connect_timeout_s
        try:
            while not self._stop.is_set():
                try:
                    ready.result(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
                    return
                except grpc.FutureTimeoutError:
                    if time.monotonic() >= deadline:
                        raise
            raise grpc.FutureTimeoutError()
        finally:
            ready.cancel()

    def _learn_limit(self, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        for key, value in metadata:
            if key == MAX_MESSAGE_METADATA:
                with contextlib.suppress(ValueError):
                    self.max_message_bytes = max(HEADER_ROOM * 2, int(value))

    def _stream_failed(self, exc: grpc.RpcError) -> None:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = (exc.details() if isinstance(exc, grpc.Call) else "") or ""
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            self.auth_failures += 1
            log.error(
                "the collector %s refused this agent (%s): check --tls-cert/--tls-key "
                "(the certificate must name this node, %r) and --token-file",
                self.target,
                _describe(exc),
                self.node,
            )
            return
        too_large = _TRANSPORT_LIMIT.search(details)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and too_large:
            # An older collector that does not say its limit: its transport limit it is.
            self.max_message_bytes = int(too_large.group(1))
        log.warning("stream to %s ended: %s", self.target, _describe(exc))

    def _on_ack(self, ack: pb.Ack) -> None:
        ok = ack.code == 0
        if not ok and ack.reason == "oversized" and ack.seq:
            entry = self._spool.get(ack.seq)
            if entry is not None:
                self._too_large(entry)
                return
        if ack.seq:
            self._spool.ack(ack.seq, ok)
        if not ok:
            self.rejections += 1
            log.warning("collector rejected seq %d: %s", ack.seq, ack.message)


def _describe(exc: grpc.RpcError) -> str:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return f"{code.name if code else '?'}: {details}"
