from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Column(_message.Message):
    __slots__ = ("name", "numbers", "categories")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUMBERS_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    numbers: NumberValues
    categories: CategoryValues
    def __init__(self, name: _Optional[str] = ..., numbers: _Optional[_Union[NumberValues, _Mapping]] = ..., categories: _Optional[_Union[CategoryValues, _Mapping]] = ...) -> None: ...

class NumberValues(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class CategoryValues(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class PredictionBatch(_message.Message):
    __slots__ = ("model", "model_version", "ids", "timestamps_unix_nano", "features", "scores", "labels", "probabilities", "class_names", "latencies_ms", "trace_ids", "span_ids", "attributes", "sample_rate", "batch_id", "events")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    LATENCIES_MS_FIELD_NUMBER: _ClassVar[int]
    TRACE_IDS_FIELD_NUMBER: _ClassVar[int]
    SPAN_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    timestamps_unix_nano: _containers.RepeatedScalarFieldContainer[int]
    features: _containers.RepeatedCompositeFieldContainer[Column]
    scores: _containers.RepeatedScalarFieldContainer[float]
    labels: _containers.RepeatedScalarFieldContainer[str]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    class_names: _containers.RepeatedScalarFieldContainer[str]
    latencies_ms: _containers.RepeatedScalarFieldContainer[float]
    trace_ids: _containers.RepeatedScalarFieldContainer[bytes]
    span_ids: _containers.RepeatedScalarFieldContainer[bytes]
    attributes: _containers.ScalarMap[str, str]
    sample_rate: float
    batch_id: str
    events: _containers.RepeatedCompositeFieldContainer[PredictionEvent]
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., timestamps_unix_nano: _Optional[_Iterable[int]] = ..., features: _Optional[_Iterable[_Union[Column, _Mapping]]] = ..., scores: _Optional[_Iterable[float]] = ..., labels: _Optional[_Iterable[str]] = ..., probabilities: _Optional[_Iterable[float]] = ..., class_names: _Optional[_Iterable[str]] = ..., latencies_ms: _Optional[_Iterable[float]] = ..., trace_ids: _Optional[_Iterable[bytes]] = ..., span_ids: _Optional[_Iterable[bytes]] = ..., attributes: _Optional[_Mapping[str, str]] = ..., sample_rate: _Optional[float] = ..., batch_id: _Optional[str] = ..., events: _Optional[_Iterable[_Union[PredictionEvent, _Mapping]]] = ...) -> None: ...

class PredictionEvent(_message.Message):
    __slots__ = ("id", "timestamp_unix_nano", "numbers", "categories", "score", "label", "latency_ms", "probabilities", "trace_id", "span_id")
    class NumbersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class CategoriesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    NUMBERS_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    timestamp_unix_nano: int
    numbers: _containers.ScalarMap[str, float]
    categories: _containers.ScalarMap[str, str]
    score: float
    label: str
    latency_ms: float
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    trace_id: bytes
    span_id: bytes
    def __init__(self, id: _Optional[str] = ..., timestamp_unix_nano: _Optional[int] = ..., numbers: _Optional[_Mapping[str, float]] = ..., categories: _Optional[_Mapping[str, str]] = ..., score: _Optional[float] = ..., label: _Optional[str] = ..., latency_ms: _Optional[float] = ..., probabilities: _Optional[_Iterable[float]] = ..., trace_id: _Optional[bytes] = ..., span_id: _Optional[bytes] = ...) -> None: ...

class OutcomeBatch(_message.Message):
    __slots__ = ("model", "model_version", "ids", "actual_values", "actual_labels", "timestamps_unix_nano", "batch_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_VALUES_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_LABELS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    actual_values: _containers.RepeatedScalarFieldContainer[float]
    actual_labels: _containers.RepeatedScalarFieldContainer[str]
    timestamps_unix_nano: _containers.RepeatedScalarFieldContainer[int]
    batch_id: str
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., actual_values: _Optional[_Iterable[float]] = ..., actual_labels: _Optional[_Iterable[str]] = ..., timestamps_unix_nano: _Optional[_Iterable[int]] = ..., batch_id: _Optional[str] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("predictions", "outcomes")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    predictions: PredictionBatch
    outcomes: OutcomeBatch
    def __init__(self, predictions: _Optional[_Union[PredictionBatch, _Mapping]] = ..., outcomes: _Optional[_Union[OutcomeBatch, _Mapping]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("accepted", "duplicate", "error")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicate: bool
    error: Error
    def __init__(self, accepted: _Optional[int] = ..., duplicate: _Optional[bool] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ModelHealthRequest(_message.Message):
    __slots__ = ("model", "model_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ModelHealth(_message.Message):
    __slots__ = ("report", "health_score", "window_start_unix_nano", "window_end_unix_nano")
    REPORT_FIELD_NUMBER: _ClassVar[int]
    HEALTH_SCORE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    report: _struct_pb2.Struct
    health_score: float
    window_start_unix_nano: int
    window_end_unix_nano: int
    def __init__(self, report: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., health_score: _Optional[float] = ..., window_start_unix_nano: _Optional[int] = ..., window_end_unix_nano: _Optional[int] = ...) -> None: ...

class PutReferenceRequest(_message.Message):
    __slots__ = ("model", "model_version", "document")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    document: bytes
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., document: _Optional[bytes] = ...) -> None: ...

class PutReferenceResponse(_message.Message):
    __slots__ = ("model", "model_version", "id", "source", "rows", "features")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    id: str
    source: str
    rows: int
    features: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., id: _Optional[str] = ..., source: _Optional[str] = ..., rows: _Optional[int] = ..., features: _Optional[_Iterable[str]] = ...) -> None: ...

class GetReferenceRequest(_message.Message):
    __slots__ = ("model", "model_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class GetReferenceResponse(_message.Message):
    __slots__ = ("model", "model_version", "id", "source", "rows", "features", "document")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    id: str
    source: str
    rows: int
    features: _containers.RepeatedScalarFieldContainer[str]
    document: bytes
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., id: _Optional[str] = ..., source: _Optional[str] = ..., rows: _Optional[int] = ..., features: _Optional[_Iterable[str]] = ..., document: _Optional[bytes] = ...) -> None: ...
