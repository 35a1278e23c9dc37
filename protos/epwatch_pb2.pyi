from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DISPATCH: _ClassVar[Phase]
    COMBINE: _ClassVar[Phase]
DISPATCH: Phase
COMBINE: Phase

class RecordBatch(_message.Message):
    __slots__ = ("ep_group", "world_size", "count", "rank", "local_device", "step", "layer", "phase", "enter_ns", "exit_ns", "send_bytes", "recv_bytes", "recv_tokens", "peer_rows", "entered", "dropped_tokens")
    EP_GROUP_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    LOCAL_DEVICE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ENTER_NS_FIELD_NUMBER: _ClassVar[int]
    EXIT_NS_FIELD_NUMBER: _ClassVar[int]
    SEND_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECV_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PEER_ROWS_FIELD_NUMBER: _ClassVar[int]
    ENTERED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ep_group: str
    world_size: int
    count: int
    rank: bytes
    local_device: bytes
    step: bytes
    layer: bytes
    phase: bytes
    enter_ns: bytes
    exit_ns: bytes
    send_bytes: bytes
    recv_bytes: bytes
    recv_tokens: bytes
    peer_rows: PeerRows
    entered: Entered
    dropped_tokens: bytes
    def __init__(self, ep_group: _Optional[str] = ..., world_size: _Optional[int] = ..., count: _Optional[int] = ..., rank: _Optional[bytes] = ..., local_device: _Optional[bytes] = ..., step: _Optional[bytes] = ..., layer: _Optional[bytes] = ..., phase: _Optional[bytes] = ..., enter_ns: _Optional[bytes] = ..., exit_ns: _Optional[bytes] = ..., send_bytes: _Optional[bytes] = ..., recv_bytes: _Optional[bytes] = ..., recv_tokens: _Optional[bytes] = ..., peer_rows: _Optional[_Union[PeerRows, _Mapping]] = ..., entered: _Optional[_Union[Entered, _Mapping]] = ..., dropped_tokens: _Optional[bytes] = ...) -> None: ...

class PeerRows(_message.Message):
    __slots__ = ("count", "rank", "step", "layer", "phase", "wait_s", "send_bytes")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    SEND_BYTES_FIELD_NUMBER: _ClassVar[int]
    count: int
    rank: bytes
    step: bytes
    layer: bytes
    phase: bytes
    wait_s: bytes
    send_bytes: bytes
    def __init__(self, count: _Optional[int] = ..., rank: _Optional[bytes] = ..., step: _Optional[bytes] = ..., layer: _Optional[bytes] = ..., phase: _Optional[bytes] = ..., wait_s: _Optional[bytes] = ..., send_bytes: _Optional[bytes] = ...) -> None: ...

class Entered(_message.Message):
    __slots__ = ("count", "rank", "step", "layer", "phase")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    count: int
    rank: bytes
    step: bytes
    layer: bytes
    phase: bytes
    def __init__(self, count: _Optional[int] = ..., rank: _Optional[bytes] = ..., step: _Optional[bytes] = ..., layer: _Optional[bytes] = ..., phase: _Optional[bytes] = ...) -> None: ...

class IntervalBatch(_message.Message):
    __slots__ = ("ep_group", "world_size", "count", "local_experts", "rank", "start_ns", "end_ns", "step", "dispatch_wait_s", "combine_wait_s", "expert_tokens")
    EP_GROUP_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    START_NS_FIELD_NUMBER: _ClassVar[int]
    END_NS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    COMBINE_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    EXPERT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ep_group: str
    world_size: int
    count: int
    local_experts: int
    rank: bytes
    start_ns: bytes
    end_ns: bytes
    step: bytes
    dispatch_wait_s: bytes
    combine_wait_s: bytes
    expert_tokens: bytes
    def __init__(self, ep_group: _Optional[str] = ..., world_size: _Optional[int] = ..., count: _Optional[int] = ..., local_experts: _Optional[int] = ..., rank: _Optional[bytes] = ..., start_ns: _Optional[bytes] = ..., end_ns: _Optional[bytes] = ..., step: _Optional[bytes] = ..., dispatch_wait_s: _Optional[bytes] = ..., combine_wait_s: _Optional[bytes] = ..., expert_tokens: _Optional[bytes] = ...) -> None: ...

class NodeSample(_message.Message):
    __slots__ = ("time_unix_ns", "points", "samplers")
    TIME_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLERS_FIELD_NUMBER: _ClassVar[int]
    time_unix_ns: int
    points: _containers.RepeatedCompositeFieldContainer[MetricPoint]
    samplers: _containers.RepeatedCompositeFieldContainer[SamplerStatus]
    def __init__(self, time_unix_ns: _Optional[int] = ..., points: _Optional[_Iterable[_Union[MetricPoint, _Mapping]]] = ..., samplers: _Optional[_Iterable[_Union[SamplerStatus, _Mapping]]] = ...) -> None: ...

class MetricPoint(_message.Message):
    __slots__ = ("name", "labels", "value", "kind", "help")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        GAUGE: _ClassVar[MetricPoint.Kind]
        COUNTER: _ClassVar[MetricPoint.Kind]
    GAUGE: MetricPoint.Kind
    COUNTER: MetricPoint.Kind
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    HELP_FIELD_NUMBER: _ClassVar[int]
    name: str
    labels: _containers.ScalarMap[str, str]
    value: float
    kind: MetricPoint.Kind
    help: str
    def __init__(self, name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., value: _Optional[float] = ..., kind: _Optional[_Union[MetricPoint.Kind, str]] = ..., help: _Optional[str] = ...) -> None: ...

class SamplerStatus(_message.Message):
    __slots__ = ("name", "ok", "duration_s", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    ok: bool
    duration_s: float
    error: str
    def __init__(self, name: _Optional[str] = ..., ok: _Optional[bool] = ..., duration_s: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class AgentStats(_message.Message):
    __slots__ = ("records_received", "records_dropped", "spool_records", "hook_records_dropped")
    RECORDS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    RECORDS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    SPOOL_RECORDS_FIELD_NUMBER: _ClassVar[int]
    HOOK_RECORDS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    records_received: int
    records_dropped: int
    spool_records: int
    hook_records_dropped: int
    def __init__(self, records_received: _Optional[int] = ..., records_dropped: _Optional[int] = ..., spool_records: _Optional[int] = ..., hook_records_dropped: _Optional[int] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("agent_id", "node", "seq", "batch", "sample", "intervals", "stats", "schema")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    INTERVALS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    node: str
    seq: int
    batch: RecordBatch
    sample: NodeSample
    intervals: IntervalBatch
    stats: AgentStats
    schema: int
    def __init__(self, agent_id: _Optional[str] = ..., node: _Optional[str] = ..., seq: _Optional[int] = ..., batch: _Optional[_Union[RecordBatch, _Mapping]] = ..., sample: _Optional[_Union[NodeSample, _Mapping]] = ..., intervals: _Optional[_Union[IntervalBatch, _Mapping]] = ..., stats: _Optional[_Union[AgentStats, _Mapping]] = ..., schema: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("seq", "code", "message", "duplicate", "reason")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    seq: int
    code: int
    message: str
    duplicate: bool
    reason: str
    def __init__(self, seq: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., duplicate: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...
