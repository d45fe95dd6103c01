import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VMMetrics(_message.Message):
    __slots__ = ("timestamp", "cpu_time_nanos", "memory_usage_bytes", "disk_read_bytes", "disk_write_bytes", "network_rx_bytes", "network_tx_bytes")
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    CPU_TIME_NANOS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_READ_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_WRITE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NETWORK_RX_BYTES_FIELD_NUMBER: _ClassVar[int]
    NETWORK_TX_BYTES_FIELD_NUMBER: _ClassVar[int]
    timestamp: _timestamp_pb2.Timestamp
    cpu_time_nanos: int
    memory_usage_bytes: int
    disk_read_bytes: int
    disk_write_bytes: int
    network_rx_bytes: int
    network_tx_bytes: int
    def __init__(self, timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cpu_time_nanos: _Optional[int] = ..., memory_usage_bytes: _Optional[int] = ..., disk_read_bytes: _Optional[int] = ..., disk_write_bytes: _Optional[int] = ..., network_rx_bytes: _Optional[int] = ..., network_tx_bytes: _Optional[int] = ...) -> None: ...

class SendMetricsBatchRequest(_message.Message):
    __slots__ = ("vm_id", "customer_id", "metrics")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    customer_id: str
    metrics: _containers.RepeatedCompositeFieldContainer[VMMetrics]
    def __init__(self, vm_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., metrics: _Optional[_Iterable[_Union[VMMetrics, _Mapping]]] = ...) -> None: ...

class SendMetricsBatchResponse(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class SendHeartbeatRequest(_message.Message):
    __slots__ = ("instance_id", "active_vms")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VMS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    active_vms: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, instance_id: _Optional[str] = ..., active_vms: _Optional[_Iterable[str]] = ...) -> None: ...

class SendHeartbeatResponse(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    def __init__(self, success: _Optional[bool] = ...) -> None: ...

class NotifyVmStartedRequest(_message.Message):
    __slots__ = ("vm_id", "customer_id", "start_time")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    customer_id: str
    start_time: int
    def __init__(self, vm_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., start_time: _Optional[int] = ...) -> None: ...

class NotifyVmStartedResponse(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    def __init__(self, success: _Optional[bool] = ...) -> None: ...

class NotifyVmStoppedRequest(_message.Message):
    __slots__ = ("vm_id", "stop_time")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    STOP_TIME_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    stop_time: int
    def __init__(self, vm_id: _Optional[str] = ..., stop_time: _Optional[int] = ...) -> None: ...

class NotifyVmStoppedResponse(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    def __init__(self, success: _Optional[bool] = ...) -> None: ...

class NotifyPossibleGapRequest(_message.Message):
    __slots__ = ("vm_id", "last_sent", "resume_time")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_SENT_FIELD_NUMBER: _ClassVar[int]
    RESUME_TIME_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    last_sent: int
    resume_time: int
    def __init__(self, vm_id: _Optional[str] = ..., last_sent: _Optional[int] = ..., resume_time: _Optional[int] = ...) -> None: ...

class NotifyPossibleGapResponse(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    def __init__(self, success: _Optional[bool] = ...) -> None: ...
