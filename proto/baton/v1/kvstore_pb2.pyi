from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVFingerprint(_message.Message):
    __slots__ = ("model_id", "weights_digest", "kv_dtype", "kv_layout_version", "prefill_quant", "block_size")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    KV_DTYPE_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREFILL_QUANT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    weights_digest: str
    kv_dtype: str
    kv_layout_version: int
    prefill_quant: str
    block_size: int
    def __init__(self, model_id: _Optional[str] = ..., weights_digest: _Optional[str] = ..., kv_dtype: _Optional[str] = ..., kv_layout_version: _Optional[int] = ..., prefill_quant: _Optional[str] = ..., block_size: _Optional[int] = ...) -> None: ...

class BlockHeader(_message.Message):
    __slots__ = ("hash", "fingerprint", "dtype", "shape", "size", "checksum")
    HASH_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    hash: bytes
    fingerprint: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    size: int
    checksum: int
    def __init__(self, hash: _Optional[bytes] = ..., fingerprint: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., size: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class BlockChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: BlockHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[BlockHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutStart(_message.Message):
    __slots__ = ("fingerprint", "lease_id", "lease_ttl_ms")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    fingerprint: KVFingerprint
    lease_id: str
    lease_ttl_ms: int
    def __init__(self, fingerprint: _Optional[_Union[KVFingerprint, _Mapping]] = ..., lease_id: _Optional[str] = ..., lease_ttl_ms: _Optional[int] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("start", "chunks")
    START_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    start: PutStart
    chunks: _containers.RepeatedCompositeFieldContainer[BlockChunk]
    def __init__(self, start: _Optional[_Union[PutStart, _Mapping]] = ..., chunks: _Optional[_Iterable[_Union[BlockChunk, _Mapping]]] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("stored", "deduplicated")
    STORED_FIELD_NUMBER: _ClassVar[int]
    DEDUPLICATED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    deduplicated: int
    def __init__(self, stored: _Optional[int] = ..., deduplicated: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("block_hashes",)
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, block_hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[BlockChunk]
    def __init__(self, chunks: _Optional[_Iterable[_Union[BlockChunk, _Mapping]]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("block_hashes",)
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, block_hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("shards", "shard_index", "sizes", "checksums")
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[Shard]
    shard_index: _containers.RepeatedScalarFieldContainer[int]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, shards: _Optional[_Iterable[_Union[Shard, _Mapping]]] = ..., shard_index: _Optional[_Iterable[int]] = ..., sizes: _Optional[_Iterable[int]] = ..., checksums: _Optional[_Iterable[int]] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("lease_id", "block_hashes", "ttl_ms")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    ttl_ms: int
    def __init__(self, lease_id: _Optional[str] = ..., block_hashes: _Optional[_Iterable[bytes]] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class LeaseResponse(_message.Message):
    __slots__ = ("leased",)
    LEASED_FIELD_NUMBER: _ClassVar[int]
    leased: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, leased: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MetricSample(_message.Message):
    __slots__ = ("name", "labels", "value")
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
    name: str
    labels: _containers.ScalarMap[str, str]
    value: float
    def __init__(self, name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., value: _Optional[float] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("shard_id", "samples")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    samples: _containers.RepeatedCompositeFieldContainer[MetricSample]
    def __init__(self, shard_id: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[MetricSample, _Mapping]]] = ...) -> None: ...

class ListShardsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Shard(_message.Message):
    __slots__ = ("shard_id", "address")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    address: str
    def __init__(self, shard_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class ListShardsResponse(_message.Message):
    __slots__ = ("shards",)
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[Shard]
    def __init__(self, shards: _Optional[_Iterable[_Union[Shard, _Mapping]]] = ...) -> None: ...

class OpenSharedMemoryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpenSharedMemoryResponse(_message.Message):
    __slots__ = ("path", "size", "token")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    token: bytes
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., token: _Optional[bytes] = ...) -> None: ...

class PutSharedReserve(_message.Message):
    __slots__ = ("start", "headers", "token")
    START_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    start: PutStart
    headers: _containers.RepeatedCompositeFieldContainer[BlockHeader]
    token: bytes
    def __init__(self, start: _Optional[_Union[PutStart, _Mapping]] = ..., headers: _Optional[_Iterable[_Union[BlockHeader, _Mapping]]] = ..., token: _Optional[bytes] = ...) -> None: ...

class PutSharedWritten(_message.Message):
    __slots__ = ("checksums",)
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, checksums: _Optional[_Iterable[int]] = ...) -> None: ...

class PutSharedCommit(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PutSharedRequest(_message.Message):
    __slots__ = ("reserve", "commit", "written")
    RESERVE_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    reserve: PutSharedReserve
    commit: PutSharedCommit
    written: PutSharedWritten
    def __init__(self, reserve: _Optional[_Union[PutSharedReserve, _Mapping]] = ..., commit: _Optional[_Union[PutSharedCommit, _Mapping]] = ..., written: _Optional[_Union[PutSharedWritten, _Mapping]] = ...) -> None: ...

class SharedSlots(_message.Message):
    __slots__ = ("offsets",)
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    offsets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, offsets: _Optional[_Iterable[int]] = ...) -> None: ...

class PutSharedResponse(_message.Message):
    __slots__ = ("slots", "result")
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    slots: SharedSlots
    result: PutResponse
    def __init__(self, slots: _Optional[_Union[SharedSlots, _Mapping]] = ..., result: _Optional[_Union[PutResponse, _Mapping]] = ...) -> None: ...

class GetSharedStart(_message.Message):
    __slots__ = ("block_hashes", "token")
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    token: bytes
    def __init__(self, block_hashes: _Optional[_Iterable[bytes]] = ..., token: _Optional[bytes] = ...) -> None: ...

class GetSharedDone(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetSharedRequest(_message.Message):
    __slots__ = ("get", "done")
    GET_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    get: GetSharedStart
    done: GetSharedDone
    def __init__(self, get: _Optional[_Union[GetSharedStart, _Mapping]] = ..., done: _Optional[_Union[GetSharedDone, _Mapping]] = ...) -> None: ...

class SharedBlock(_message.Message):
    __slots__ = ("header", "offset")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    header: BlockHeader
    offset: int
    def __init__(self, header: _Optional[_Union[BlockHeader, _Mapping]] = ..., offset: _Optional[int] = ...) -> None: ...

class GetSharedResponse(_message.Message):
    __slots__ = ("blocks",)
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[SharedBlock]
    def __init__(self, blocks: _Optional[_Iterable[_Union[SharedBlock, _Mapping]]] = ...) -> None: ...
