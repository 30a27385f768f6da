from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Message(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Conversation(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    def __init__(self, messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ...) -> None: ...

class PromptResponse(_message.Message):
    __slots__ = ("prompt", "response")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    response: str
    def __init__(self, prompt: _Optional[str] = ..., response: _Optional[str] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("id", "conversation", "text", "tokens")
    ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    id: str
    conversation: Conversation
    text: PromptResponse
    tokens: TokenIds
    def __init__(self, id: _Optional[str] = ..., conversation: _Optional[_Union[Conversation, _Mapping]] = ..., text: _Optional[_Union[PromptResponse, _Mapping]] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class ScoreOptions(_message.Message):
    __slots__ = ("run_id", "step", "return_members", "uncertainty_penalty")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RETURN_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    return_members: bool
    uncertainty_penalty: float
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., return_members: _Optional[bool] = ..., uncertainty_penalty: _Optional[float] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("samples", "options")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    options: ScoreOptions
    def __init__(self, samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ..., options: _Optional[_Union[ScoreOptions, _Mapping]] = ...) -> None: ...

class ScoreResult(_message.Message):
    __slots__ = ("id", "reward", "std", "min", "conservative", "epistemic", "members", "num_tokens", "truncated", "ood_score", "ood")
    ID_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    CONSERVATIVE_FIELD_NUMBER: _ClassVar[int]
    EPISTEMIC_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    OOD_SCORE_FIELD_NUMBER: _ClassVar[int]
    OOD_FIELD_NUMBER: _ClassVar[int]
    id: str
    reward: float
    std: float
    min: float
    conservative: float
    epistemic: float
    members: _containers.RepeatedScalarFieldContainer[float]
    num_tokens: int
    truncated: bool
    ood_score: float
    ood: bool
    def __init__(self, id: _Optional[str] = ..., reward: _Optional[float] = ..., std: _Optional[float] = ..., min: _Optional[float] = ..., conservative: _Optional[float] = ..., epistemic: _Optional[float] = ..., members: _Optional[_Iterable[float]] = ..., num_tokens: _Optional[int] = ..., truncated: _Optional[bool] = ..., ood_score: _Optional[float] = ..., ood: _Optional[bool] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("results", "model_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoreResult]
    model_version: str
    def __init__(self, results: _Optional[_Iterable[_Union[ScoreResult, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class ScoreStreamRequest(_message.Message):
    __slots__ = ("samples", "options")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    options: ScoreOptions
    def __init__(self, samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ..., options: _Optional[_Union[ScoreOptions, _Mapping]] = ...) -> None: ...

class ChunkError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ScoreStreamResponse(_message.Message):
    __slots__ = ("results", "model_version", "error")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoreResult]
    model_version: str
    error: ChunkError
    def __init__(self, results: _Optional[_Iterable[_Union[ScoreResult, _Mapping]]] = ..., model_version: _Optional[str] = ..., error: _Optional[_Union[ChunkError, _Mapping]] = ...) -> None: ...

class Group(_message.Message):
    __slots__ = ("id", "prompt_text", "prompt_messages", "completions")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    prompt_text: str
    prompt_messages: Conversation
    completions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., prompt_text: _Optional[str] = ..., prompt_messages: _Optional[_Union[Conversation, _Mapping]] = ..., completions: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreGroupsRequest(_message.Message):
    __slots__ = ("groups", "options")
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[Group]
    options: ScoreOptions
    def __init__(self, groups: _Optional[_Iterable[_Union[Group, _Mapping]]] = ..., options: _Optional[_Union[ScoreOptions, _Mapping]] = ...) -> None: ...

class GroupResult(_message.Message):
    __slots__ = ("id", "results")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    results: _containers.RepeatedCompositeFieldContainer[ScoreResult]
    def __init__(self, id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ScoreResult, _Mapping]]] = ...) -> None: ...

class ScoreGroupsResponse(_message.Message):
    __slots__ = ("groups", "model_version")
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[GroupResult]
    model_version: str
    def __init__(self, groups: _Optional[_Iterable[_Union[GroupResult, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class CompareRequest(_message.Message):
    __slots__ = ("prompt_text", "prompt_messages", "response_a", "response_b")
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_A_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_B_FIELD_NUMBER: _ClassVar[int]
    prompt_text: str
    prompt_messages: Conversation
    response_a: str
    response_b: str
    def __init__(self, prompt_text: _Optional[str] = ..., prompt_messages: _Optional[_Union[Conversation, _Mapping]] = ..., response_a: _Optional[str] = ..., response_b: _Optional[str] = ...) -> None: ...

class CompareResponse(_message.Message):
    __slots__ = ("prob", "member_probs", "a", "b", "model_version")
    PROB_FIELD_NUMBER: _ClassVar[int]
    MEMBER_PROBS_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    prob: float
    member_probs: _containers.RepeatedScalarFieldContainer[float]
    a: ScoreResult
    b: ScoreResult
    model_version: str
    def __init__(self, prob: _Optional[float] = ..., member_probs: _Optional[_Iterable[float]] = ..., a: _Optional[_Union[ScoreResult, _Mapping]] = ..., b: _Optional[_Union[ScoreResult, _Mapping]] = ..., model_version: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Normalization(_message.Message):
    __slots__ = ("shift", "scale")
    SHIFT_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    shift: _containers.RepeatedScalarFieldContainer[float]
    scale: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, shift: _Optional[_Iterable[float]] = ..., scale: _Optional[_Iterable[float]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "kind", "num_members", "num_heads", "backbone", "max_tokens", "dtype", "normalization", "default_uncertainty_penalty", "has_epistemic", "max_samples_per_request", "backbone_layers", "ood_threshold", "ood_quantile", "ood_calibrated_on")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_UNCERTAINTY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    HAS_EPISTEMIC_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    OOD_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    OOD_QUANTILE_FIELD_NUMBER: _ClassVar[int]
    OOD_CALIBRATED_ON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    kind: str
    num_members: int
    num_heads: int
    backbone: str
    max_tokens: int
    dtype: str
    normalization: Normalization
    default_uncertainty_penalty: float
    has_epistemic: bool
    max_samples_per_request: int
    backbone_layers: int
    ood_threshold: float
    ood_quantile: float
    ood_calibrated_on: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., kind: _Optional[str] = ..., num_members: _Optional[int] = ..., num_heads: _Optional[int] = ..., backbone: _Optional[str] = ..., max_tokens: _Optional[int] = ..., dtype: _Optional[str] = ..., normalization: _Optional[_Union[Normalization, _Mapping]] = ..., default_uncertainty_penalty: _Optional[float] = ..., has_epistemic: _Optional[bool] = ..., max_samples_per_request: _Optional[int] = ..., backbone_layers: _Optional[int] = ..., ood_threshold: _Optional[float] = ..., ood_quantile: _Optional[float] = ..., ood_calibrated_on: _Optional[str] = ...) -> None: ...

class GetRunStatusRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class RunStep(_message.Message):
    __slots__ = ("first_step", "last_step", "count", "reward_mean", "reward_p10", "reward_p50", "reward_p90", "std_mean", "reward_std_corr", "top_decile_reward", "top_decile_std", "epistemic_mean", "ood_score_mean", "ood_fraction", "top_decile_ood_fraction")
    FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    REWARD_MEAN_FIELD_NUMBER: _ClassVar[int]
    REWARD_P10_FIELD_NUMBER: _ClassVar[int]
    REWARD_P50_FIELD_NUMBER: _ClassVar[int]
    REWARD_P90_FIELD_NUMBER: _ClassVar[int]
    STD_MEAN_FIELD_NUMBER: _ClassVar[int]
    REWARD_STD_CORR_FIELD_NUMBER: _ClassVar[int]
    TOP_DECILE_REWARD_FIELD_NUMBER: _ClassVar[int]
    TOP_DECILE_STD_FIELD_NUMBER: _ClassVar[int]
    EPISTEMIC_MEAN_FIELD_NUMBER: _ClassVar[int]
    OOD_SCORE_MEAN_FIELD_NUMBER: _ClassVar[int]
    OOD_FRACTION_FIELD_NUMBER: _ClassVar[int]
    TOP_DECILE_OOD_FRACTION_FIELD_NUMBER: _ClassVar[int]
    first_step: int
    last_step: int
    count: int
    reward_mean: float
    reward_p10: float
    reward_p50: float
    reward_p90: float
    std_mean: float
    reward_std_corr: float
    top_decile_reward: float
    top_decile_std: float
    epistemic_mean: float
    ood_score_mean: float
    ood_fraction: float
    top_decile_ood_fraction: float
    def __init__(self, first_step: _Optional[int] = ..., last_step: _Optional[int] = ..., count: _Optional[int] = ..., reward_mean: _Optional[float] = ..., reward_p10: _Optional[float] = ..., reward_p50: _Optional[float] = ..., reward_p90: _Optional[float] = ..., std_mean: _Optional[float] = ..., reward_std_corr: _Optional[float] = ..., top_decile_reward: _Optional[float] = ..., top_decile_std: _Optional[float] = ..., epistemic_mean: _Optional[float] = ..., ood_score_mean: _Optional[float] = ..., ood_fraction: _Optional[float] = ..., top_decile_ood_fraction: _Optional[float] = ...) -> None: ...

class RunStatus(_message.Message):
    __slots__ = ("run_id", "steps", "alarm", "alarm_step", "reason", "series", "last_seen_unix")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ALARM_FIELD_NUMBER: _ClassVar[int]
    ALARM_STEP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SERIES_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    steps: int
    alarm: bool
    alarm_step: int
    reason: str
    series: _containers.RepeatedCompositeFieldContainer[RunStep]
    last_seen_unix: float
    def __init__(self, run_id: _Optional[str] = ..., steps: _Optional[int] = ..., alarm: _Optional[bool] = ..., alarm_step: _Optional[int] = ..., reason: _Optional[str] = ..., series: _Optional[_Iterable[_Union[RunStep, _Mapping]]] = ..., last_seen_unix: _Optional[float] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunStatus]
    def __init__(self, runs: _Optional[_Iterable[_Union[RunStatus, _Mapping]]] = ...) -> None: ...
