from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ApiKey(_message.Message):
    __slots__ = ("key_id", "customer_id", "role", "created_at_unix", "expires_at_unix", "revoked_at_unix", "status", "description")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    customer_id: str
    role: str
    created_at_unix: int
    expires_at_unix: int
    revoked_at_unix: int
    status: str
    description: str
    def __init__(self, key_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., role: _Optional[str] = ..., created_at_unix: _Optional[int] = ..., expires_at_unix: _Optional[int] = ..., revoked_at_unix: _Optional[int] = ..., status: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("customer_id", "role", "expires_in_seconds", "description")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    role: str
    expires_in_seconds: int
    description: str
    def __init__(self, customer_id: _Optional[str] = ..., role: _Optional[str] = ..., expires_in_seconds: _Optional[int] = ..., description: _Optional[str] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("key", "token")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    token: str
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ..., token: _Optional[str] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class RevokeApiKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class Quota(_message.Message):
    __slots__ = ("resource", "unlimited", "limit", "override", "used")
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    UNLIMITED_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OVERRIDE_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    resource: str
    unlimited: bool
    limit: int
    override: bool
    used: int
    def __init__(self, resource: _Optional[str] = ..., unlimited: _Optional[bool] = ..., limit: _Optional[int] = ..., override: _Optional[bool] = ..., used: _Optional[int] = ...) -> None: ...

class GetQuotaRequest(_message.Message):
    __slots__ = ("customer_id",)
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    def __init__(self, customer_id: _Optional[str] = ...) -> None: ...

class GetQuotaResponse(_message.Message):
    __slots__ = ("customer_id", "quotas")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    quotas: _containers.RepeatedCompositeFieldContainer[Quota]
    def __init__(self, customer_id: _Optional[str] = ..., quotas: _Optional[_Iterable[_Union[Quota, _Mapping]]] = ...) -> None: ...

class QuotaChange(_message.Message):
    __slots__ = ("resource", "limit", "unlimited", "default")
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    UNLIMITED_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    resource: str
    limit: int
    unlimited: bool
    default: bool
    def __init__(self, resource: _Optional[str] = ..., limit: _Optional[int] = ..., unlimited: _Optional[bool] = ..., default: _Optional[bool] = ...) -> None: ...

class SetQuotaRequest(_message.Message):
    __slots__ = ("customer_id", "changes", "clear")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    changes: _containers.RepeatedCompositeFieldContainer[QuotaChange]
    clear: bool
    def __init__(self, customer_id: _Optional[str] = ..., changes: _Optional[_Iterable[_Union[QuotaChange, _Mapping]]] = ..., clear: _Optional[bool] = ...) -> None: ...

class SetQuotaResponse(_message.Message):
    __slots__ = ("customer_id", "quotas")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    quotas: _containers.RepeatedCompositeFieldContainer[Quota]
    def __init__(self, customer_id: _Optional[str] = ..., quotas: _Optional[_Iterable[_Union[Quota, _Mapping]]] = ...) -> None: ...
