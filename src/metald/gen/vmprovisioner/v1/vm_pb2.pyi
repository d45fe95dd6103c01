from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VmState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VM_STATE_UNSPECIFIED: _ClassVar[VmState]
    VM_STATE_CREATED: _ClassVar[VmState]
    VM_STATE_RUNNING: _ClassVar[VmState]
    VM_STATE_PAUSED: _ClassVar[VmState]
    VM_STATE_SHUTDOWN: _ClassVar[VmState]

class NetworkMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NETWORK_MODE_UNSPECIFIED: _ClassVar[NetworkMode]
    NETWORK_MODE_DUAL_STACK: _ClassVar[NetworkMode]
    NETWORK_MODE_IPV4_ONLY: _ClassVar[NetworkMode]
    NETWORK_MODE_IPV6_ONLY: _ClassVar[NetworkMode]
VM_STATE_UNSPECIFIED: VmState
VM_STATE_CREATED: VmState
VM_STATE_RUNNING: VmState
VM_STATE_PAUSED: VmState
VM_STATE_SHUTDOWN: VmState
NETWORK_MODE_UNSPECIFIED: NetworkMode
NETWORK_MODE_DUAL_STACK: NetworkMode
NETWORK_MODE_IPV4_ONLY: NetworkMode
NETWORK_MODE_IPV6_ONLY: NetworkMode

class VmConfig(_message.Message):
    __slots__ = ("cpu", "memory", "boot", "storage", "network", "console", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    BOOT_FIELD_NUMBER: _ClassVar[int]
    STORAGE_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    CONSOLE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    cpu: CpuConfig
    memory: MemoryConfig
    boot: BootConfig
    storage: _containers.RepeatedCompositeFieldContainer[StorageDevice]
    network: _containers.RepeatedCompositeFieldContainer[NetworkInterface]
    console: ConsoleConfig
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, cpu: _Optional[_Union[CpuConfig, _Mapping]] = ..., memory: _Optional[_Union[MemoryConfig, _Mapping]] = ..., boot: _Optional[_Union[BootConfig, _Mapping]] = ..., storage: _Optional[_Iterable[_Union[StorageDevice, _Mapping]]] = ..., network: _Optional[_Iterable[_Union[NetworkInterface, _Mapping]]] = ..., console: _Optional[_Union[ConsoleConfig, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CpuConfig(_message.Message):
    __slots__ = ("vcpu_count", "max_vcpu_count", "topology", "features")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VCPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MAX_VCPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    vcpu_count: int
    max_vcpu_count: int
    topology: CpuTopology
    features: _containers.ScalarMap[str, str]
    def __init__(self, vcpu_count: _Optional[int] = ..., max_vcpu_count: _Optional[int] = ..., topology: _Optional[_Union[CpuTopology, _Mapping]] = ..., features: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CpuTopology(_message.Message):
    __slots__ = ("sockets", "cores_per_socket", "threads_per_core")
    SOCKETS_FIELD_NUMBER: _ClassVar[int]
    CORES_PER_SOCKET_FIELD_NUMBER: _ClassVar[int]
    THREADS_PER_CORE_FIELD_NUMBER: _ClassVar[int]
    sockets: int
    cores_per_socket: int
    threads_per_core: int
    def __init__(self, sockets: _Optional[int] = ..., cores_per_socket: _Optional[int] = ..., threads_per_core: _Optional[int] = ...) -> None: ...

class MemoryConfig(_message.Message):
    __slots__ = ("size_bytes", "hotplug_enabled", "max_size_bytes", "backing")
    class BackingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOTPLUG_ENABLED_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BACKING_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    hotplug_enabled: bool
    max_size_bytes: int
    backing: _containers.ScalarMap[str, str]
    def __init__(self, size_bytes: _Optional[int] = ..., hotplug_enabled: _Optional[bool] = ..., max_size_bytes: _Optional[int] = ..., backing: _Optional[_Mapping[str, str]] = ...) -> None: ...

class BootConfig(_message.Message):
    __slots__ = ("kernel_path", "initrd_path", "kernel_args", "boot_options")
    class BootOptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KERNEL_PATH_FIELD_NUMBER: _ClassVar[int]
    INITRD_PATH_FIELD_NUMBER: _ClassVar[int]
    KERNEL_ARGS_FIELD_NUMBER: _ClassVar[int]
    BOOT_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    kernel_path: str
    initrd_path: str
    kernel_args: str
    boot_options: _containers.ScalarMap[str, str]
    def __init__(self, kernel_path: _Optional[str] = ..., initrd_path: _Optional[str] = ..., kernel_args: _Optional[str] = ..., boot_options: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StorageDevice(_message.Message):
    __slots__ = ("id", "path", "read_only", "is_root_device", "interface_type", "options")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    IS_ROOT_DEVICE_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_TYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    path: str
    read_only: bool
    is_root_device: bool
    interface_type: str
    options: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., path: _Optional[str] = ..., read_only: _Optional[bool] = ..., is_root_device: _Optional[bool] = ..., interface_type: _Optional[str] = ..., options: _Optional[_Mapping[str, str]] = ...) -> None: ...

class NetworkInterface(_message.Message):
    __slots__ = ("id", "mac_address", "tap_device", "interface_type", "options", "ipv4_config", "ipv6_config", "mode", "rx_rate_limit", "tx_rate_limit")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    MAC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TAP_DEVICE_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_TYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    IPV4_CONFIG_FIELD_NUMBER: _ClassVar[int]
    IPV6_CONFIG_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    RX_RATE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    TX_RATE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    id: str
    mac_address: str
    tap_device: str
    interface_type: str
    options: _containers.ScalarMap[str, str]
    ipv4_config: IPv4Config
    ipv6_config: IPv6Config
    mode: NetworkMode
    rx_rate_limit: RateLimit
    tx_rate_limit: RateLimit
    def __init__(self, id: _Optional[str] = ..., mac_address: _Optional[str] = ..., tap_device: _Optional[str] = ..., interface_type: _Optional[str] = ..., options: _Optional[_Mapping[str, str]] = ..., ipv4_config: _Optional[_Union[IPv4Config, _Mapping]] = ..., ipv6_config: _Optional[_Union[IPv6Config, _Mapping]] = ..., mode: _Optional[_Union[NetworkMode, str]] = ..., rx_rate_limit: _Optional[_Union[RateLimit, _Mapping]] = ..., tx_rate_limit: _Optional[_Union[RateLimit, _Mapping]] = ...) -> None: ...

class IPv4Config(_message.Message):
    __slots__ = ("address", "netmask", "gateway", "dns_servers", "dhcp")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NETMASK_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    DNS_SERVERS_FIELD_NUMBER: _ClassVar[int]
    DHCP_FIELD_NUMBER: _ClassVar[int]
    address: str
    netmask: str
    gateway: str
    dns_servers: _containers.RepeatedScalarFieldContainer[str]
    dhcp: bool
    def __init__(self, address: _Optional[str] = ..., netmask: _Optional[str] = ..., gateway: _Optional[str] = ..., dns_servers: _Optional[_Iterable[str]] = ..., dhcp: _Optional[bool] = ...) -> None: ...

class IPv6Config(_message.Message):
    __slots__ = ("address", "prefix_length", "gateway", "dns_servers", "slaac", "privacy_extensions", "link_local")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    DNS_SERVERS_FIELD_NUMBER: _ClassVar[int]
    SLAAC_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_EXTENSIONS_FIELD_NUMBER: _ClassVar[int]
    LINK_LOCAL_FIELD_NUMBER: _ClassVar[int]
    address: str
    prefix_length: int
    gateway: str
    dns_servers: _containers.RepeatedScalarFieldContainer[str]
    slaac: bool
    privacy_extensions: bool
    link_local: str
    def __init__(self, address: _Optional[str] = ..., prefix_length: _Optional[int] = ..., gateway: _Optional[str] = ..., dns_servers: _Optional[_Iterable[str]] = ..., slaac: _Optional[bool] = ..., privacy_extensions: _Optional[bool] = ..., link_local: _Optional[str] = ...) -> None: ...

class RateLimit(_message.Message):
    __slots__ = ("bandwidth", "refill_time", "burst")
    BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    REFILL_TIME_FIELD_NUMBER: _ClassVar[int]
    BURST_FIELD_NUMBER: _ClassVar[int]
    bandwidth: int
    refill_time: int
    burst: int
    def __init__(self, bandwidth: _Optional[int] = ..., refill_time: _Optional[int] = ..., burst: _Optional[int] = ...) -> None: ...

class ConsoleConfig(_message.Message):
    __slots__ = ("enabled", "output", "input", "console_type")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    CONSOLE_TYPE_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    output: str
    input: str
    console_type: str
    def __init__(self, enabled: _Optional[bool] = ..., output: _Optional[str] = ..., input: _Optional[str] = ..., console_type: _Optional[str] = ...) -> None: ...

class CreateVmRequest(_message.Message):
    __slots__ = ("vm_id", "config", "customer_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    config: VmConfig
    customer_id: str
    def __init__(self, vm_id: _Optional[str] = ..., config: _Optional[_Union[VmConfig, _Mapping]] = ..., customer_id: _Optional[str] = ...) -> None: ...

class CreateVmResponse(_message.Message):
    __slots__ = ("vm_id", "state")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    state: VmState
    def __init__(self, vm_id: _Optional[str] = ..., state: _Optional[_Union[VmState, str]] = ...) -> None: ...

class DeleteVmRequest(_message.Message):
    __slots__ = ("vm_id", "force")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    force: bool
    def __init__(self, vm_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class DeleteVmResponse(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    def __init__(self, success: _Optional[bool] = ...) -> None: ...

class BootVmRequest(_message.Message):
    __slots__ = ("vm_id",)
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    def __init__(self, vm_id: _Optional[str] = ...) -> None: ...

class BootVmResponse(_message.Message):
    __slots__ = ("success", "state")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    state: VmState
    def __init__(self, success: _Optional[bool] = ..., state: _Optional[_Union[VmState, str]] = ...) -> None: ...

class ShutdownVmRequest(_message.Message):
    __slots__ = ("vm_id", "force", "timeout_seconds")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    force: bool
    timeout_seconds: int
    def __init__(self, vm_id: _Optional[str] = ..., force: _Optional[bool] = ..., timeout_seconds: _Optional[int] = ...) -> None: ...

class ShutdownVmResponse(_message.Message):
    __slots__ = ("success", "state")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    state: VmState
    def __init__(self, success: _Optional[bool] = ..., state: _Optional[_Union[VmState, str]] = ...) -> None: ...

class PauseVmRequest(_message.Message):
    __slots__ = ("vm_id",)
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    def __init__(self, vm_id: _Optional[str] = ...) -> None: ...

class PauseVmResponse(_message.Message):
    __slots__ = ("success", "state")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    state: VmState
    def __init__(self, success: _Optional[bool] = ..., state: _Optional[_Union[VmState, str]] = ...) -> None: ...

class ResumeVmRequest(_message.Message):
    __slots__ = ("vm_id",)
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    def __init__(self, vm_id: _Optional[str] = ...) -> None: ...

class ResumeVmResponse(_message.Message):
    __slots__ = ("success", "state")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    state: VmState
    def __init__(self, success: _Optional[bool] = ..., state: _Optional[_Union[VmState, str]] = ...) -> None: ...

class RebootVmRequest(_message.Message):
    __slots__ = ("vm_id", "force")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    force: bool
    def __init__(self, vm_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class RebootVmResponse(_message.Message):
    __slots__ = ("success", "state")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    state: VmState
    def __init__(self, success: _Optional[bool] = ..., state: _Optional[_Union[VmState, str]] = ...) -> None: ...

class GetVmInfoRequest(_message.Message):
    __slots__ = ("vm_id",)
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    def __init__(self, vm_id: _Optional[str] = ...) -> None: ...

class GetVmInfoResponse(_message.Message):
    __slots__ = ("vm_id", "config", "state", "metrics", "backend_info", "network_info")
    class BackendInfoEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_INFO_FIELD_NUMBER: _ClassVar[int]
    NETWORK_INFO_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    config: VmConfig
    state: VmState
    metrics: VmMetrics
    backend_info: _containers.ScalarMap[str, str]
    network_info: VmNetworkInfo
    def __init__(self, vm_id: _Optional[str] = ..., config: _Optional[_Union[VmConfig, _Mapping]] = ..., state: _Optional[_Union[VmState, str]] = ..., metrics: _Optional[_Union[VmMetrics, _Mapping]] = ..., backend_info: _Optional[_Mapping[str, str]] = ..., network_info: _Optional[_Union[VmNetworkInfo, _Mapping]] = ...) -> None: ...

class VmNetworkInfo(_message.Message):
    __slots__ = ("ip_address", "mac_address", "tap_device", "network_namespace", "gateway", "dns_servers", "port_mappings", "ipv6_address", "ipv6_gateway")
    IP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MAC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TAP_DEVICE_FIELD_NUMBER: _ClassVar[int]
    NETWORK_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    DNS_SERVERS_FIELD_NUMBER: _ClassVar[int]
    PORT_MAPPINGS_FIELD_NUMBER: _ClassVar[int]
    IPV6_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    IPV6_GATEWAY_FIELD_NUMBER: _ClassVar[int]
    ip_address: str
    mac_address: str
    tap_device: str
    network_namespace: str
    gateway: str
    dns_servers: _containers.RepeatedScalarFieldContainer[str]
    port_mappings: _containers.RepeatedCompositeFieldContainer[PortMapping]
    ipv6_address: str
    ipv6_gateway: str
    def __init__(self, ip_address: _Optional[str] = ..., mac_address: _Optional[str] = ..., tap_device: _Optional[str] = ..., network_namespace: _Optional[str] = ..., gateway: _Optional[str] = ..., dns_servers: _Optional[_Iterable[str]] = ..., port_mappings: _Optional[_Iterable[_Union[PortMapping, _Mapping]]] = ..., ipv6_address: _Optional[str] = ..., ipv6_gateway: _Optional[str] = ...) -> None: ...

class PortMapping(_message.Message):
    __slots__ = ("container_port", "host_port", "protocol")
    CONTAINER_PORT_FIELD_NUMBER: _ClassVar[int]
    HOST_PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    container_port: int
    host_port: int
    protocol: str
    def __init__(self, container_port: _Optional[int] = ..., host_port: _Optional[int] = ..., protocol: _Optional[str] = ...) -> None: ...

class VmMetrics(_message.Message):
    __slots__ = ("cpu_usage_percent", "memory_usage_bytes", "network_stats", "storage_stats", "uptime_seconds")
    CPU_USAGE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NETWORK_STATS_FIELD_NUMBER: _ClassVar[int]
    STORAGE_STATS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    cpu_usage_percent: float
    memory_usage_bytes: int
    network_stats: NetworkStats
    storage_stats: StorageStats
    uptime_seconds: int
    def __init__(self, cpu_usage_percent: _Optional[float] = ..., memory_usage_bytes: _Optional[int] = ..., network_stats: _Optional[_Union[NetworkStats, _Mapping]] = ..., storage_stats: _Optional[_Union[StorageStats, _Mapping]] = ..., uptime_seconds: _Optional[int] = ...) -> None: ...

class NetworkStats(_message.Message):
    __slots__ = ("bytes_received", "bytes_transmitted", "packets_received", "packets_transmitted")
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_TRANSMITTED_FIELD_NUMBER: _ClassVar[int]
    PACKETS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    PACKETS_TRANSMITTED_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    bytes_transmitted: int
    packets_received: int
    packets_transmitted: int
    def __init__(self, bytes_received: _Optional[int] = ..., bytes_transmitted: _Optional[int] = ..., packets_received: _Optional[int] = ..., packets_transmitted: _Optional[int] = ...) -> None: ...

class StorageStats(_message.Message):
    __slots__ = ("bytes_read", "bytes_written", "read_operations", "write_operations")
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    READ_OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    WRITE_OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    bytes_read: int
    bytes_written: int
    read_operations: int
    write_operations: int
    def __init__(self, bytes_read: _Optional[int] = ..., bytes_written: _Optional[int] = ..., read_operations: _Optional[int] = ..., write_operations: _Optional[int] = ...) -> None: ...

class ListVmsRequest(_message.Message):
    __slots__ = ("state_filter", "page_size", "page_token", "customer_id")
    STATE_FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    state_filter: _containers.RepeatedScalarFieldContainer[VmState]
    page_size: int
    page_token: str
    customer_id: str
    def __init__(self, state_filter: _Optional[_Iterable[_Union[VmState, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., customer_id: _Optional[str] = ...) -> None: ...

class ListVmsResponse(_message.Message):
    __slots__ = ("vms", "next_page_token", "total_count")
    VMS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_COUNT_FIELD_NUMBER: _ClassVar[int]
    vms: _containers.RepeatedCompositeFieldContainer[VmInfo]
    next_page_token: str
    total_count: int
    def __init__(self, vms: _Optional[_Iterable[_Union[VmInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_count: _Optional[int] = ...) -> None: ...

class VmInfo(_message.Message):
    __slots__ = ("vm_id", "state", "vcpu_count", "memory_size_bytes", "created_timestamp", "modified_timestamp", "metadata", "customer_id")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VCPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    MODIFIED_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    state: VmState
    vcpu_count: int
    memory_size_bytes: int
    created_timestamp: int
    modified_timestamp: int
    metadata: _containers.ScalarMap[str, str]
    customer_id: str
    def __init__(self, vm_id: _Optional[str] = ..., state: _Optional[_Union[VmState, str]] = ..., vcpu_count: _Optional[int] = ..., memory_size_bytes: _Optional[int] = ..., created_timestamp: _Optional[int] = ..., modified_timestamp: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ..., customer_id: _Optional[str] = ...) -> None: ...

class GetVmConsoleRequest(_message.Message):
    __slots__ = ("vm_id", "offset", "max_bytes")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    offset: int
    max_bytes: int
    def __init__(self, vm_id: _Optional[str] = ..., offset: _Optional[int] = ..., max_bytes: _Optional[int] = ...) -> None: ...

class GetVmConsoleResponse(_message.Message):
    __slots__ = ("data", "offset", "next_offset", "size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    next_offset: int
    size: int
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., next_offset: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...
