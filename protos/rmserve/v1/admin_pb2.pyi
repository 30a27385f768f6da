from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrainRequest(_message.Message):
    __slots__ = ("data_path", "dev_path", "kind", "num_heads", "finetune_layers", "epochs", "lr", "seed", "backbone", "activate", "name", "max_tokens", "options_json")
    DATA_PATH_FIELD_NUMBER: _ClassVar[int]
    DEV_PATH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    FINETUNE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    data_path: str
    dev_path: str
    kind: str
    num_heads: int
    finetune_layers: int
    epochs: int
    lr: float
    seed: int
    backbone: str
    activate: bool
    name: str
    max_tokens: int
    options_json: str
    def __init__(self, data_path: _Optional[str] = ..., dev_path: _Optional[str] = ..., kind: _Optional[str] = ..., num_heads: _Optional[int] = ..., finetune_layers: _Optional[int] = ..., epochs: _Optional[int] = ..., lr: _Optional[float] = ..., seed: _Optional[int] = ..., backbone: _Optional[str] = ..., activate: _Optional[bool] = ..., name: _Optional[str] = ..., max_tokens: _Optional[int] = ..., options_json: _Optional[str] = ...) -> None: ...

class TrainProgress(_message.Message):
    __slots__ = ("event", "phase", "step", "total", "member", "epoch", "loss", "accuracy", "eta_s", "elapsed_s", "message", "version", "report_json")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    event: str
    phase: str
    step: int
    total: int
    member: int
    epoch: int
    loss: float
    accuracy: float
    eta_s: float
    elapsed_s: float
    message: str
    version: str
    report_json: str
    def __init__(self, event: _Optional[str] = ..., phase: _Optional[str] = ..., step: _Optional[int] = ..., total: _Optional[int] = ..., member: _Optional[int] = ..., epoch: _Optional[int] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., eta_s: _Optional[float] = ..., elapsed_s: _Optional[float] = ..., message: _Optional[str] = ..., version: _Optional[str] = ..., report_json: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("version", "name", "created_unix", "active", "report_json")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    version: str
    name: str
    created_unix: float
    active: bool
    report_json: str
    def __init__(self, version: _Optional[str] = ..., name: _Optional[str] = ..., created_unix: _Optional[float] = ..., active: _Optional[bool] = ..., report_json: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "active_version")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    active_version: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., active_version: _Optional[str] = ...) -> None: ...

class ActivateModelRequest(_message.Message):
    __slots__ = ("version", "propagate")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROPAGATE_FIELD_NUMBER: _ClassVar[int]
    version: str
    propagate: bool
    def __init__(self, version: _Optional[str] = ..., propagate: _Optional[bool] = ...) -> None: ...

class ActivateModelResponse(_message.Message):
    __slots__ = ("version", "previous_version", "load_seconds", "propagated")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROPAGATED_FIELD_NUMBER: _ClassVar[int]
    version: str
    previous_version: str
    load_seconds: float
    propagated: bool
    def __init__(self, version: _Optional[str] = ..., previous_version: _Optional[str] = ..., load_seconds: _Optional[float] = ..., propagated: _Optional[bool] = ...) -> None: ...
