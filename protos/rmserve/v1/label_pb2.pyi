from rmserve.v1 import reward_pb2 as _reward_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Ranking(_message.Message):
    __slots__ = ("ranks",)
    RANKS_FIELD_NUMBER: _ClassVar[int]
    ranks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ranks: _Optional[_Iterable[int]] = ...) -> None: ...

class Preference(_message.Message):
    __slots__ = ("id", "prompt_text", "prompt_messages", "responses", "choice", "ranking", "tie", "margin", "labeler", "labeler_kind", "judge", "guideline", "rationale", "tag", "timestamp_unix")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    TIE_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    LABELER_FIELD_NUMBER: _ClassVar[int]
    LABELER_KIND_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    GUIDELINE_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_FIELD_NUMBER: _ClassVar[int]
    id: str
    prompt_text: str
    prompt_messages: _reward_pb2.Conversation
    responses: _containers.RepeatedScalarFieldContainer[str]
    choice: int
    ranking: Ranking
    tie: bool
    margin: float
    labeler: str
    labeler_kind: str
    judge: str
    guideline: str
    rationale: str
    tag: str
    timestamp_unix: float
    def __init__(self, id: _Optional[str] = ..., prompt_text: _Optional[str] = ..., prompt_messages: _Optional[_Union[_reward_pb2.Conversation, _Mapping]] = ..., responses: _Optional[_Iterable[str]] = ..., choice: _Optional[int] = ..., ranking: _Optional[_Union[Ranking, _Mapping]] = ..., tie: _Optional[bool] = ..., margin: _Optional[float] = ..., labeler: _Optional[str] = ..., labeler_kind: _Optional[str] = ..., judge: _Optional[str] = ..., guideline: _Optional[str] = ..., rationale: _Optional[str] = ..., tag: _Optional[str] = ..., timestamp_unix: _Optional[float] = ...) -> None: ...

class SubmitPreferencesRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Preference]
    def __init__(self, items: _Optional[_Iterable[_Union[Preference, _Mapping]]] = ...) -> None: ...

class SubmitPreferencesResponse(_message.Message):
    __slots__ = ("accepted", "duplicates", "total")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicates: int
    total: int
    def __init__(self, accepted: _Optional[int] = ..., duplicates: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("id", "prompt_text", "prompt_messages", "responses")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    id: str
    prompt_text: str
    prompt_messages: _reward_pb2.Conversation
    responses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., prompt_text: _Optional[str] = ..., prompt_messages: _Optional[_Union[_reward_pb2.Conversation, _Mapping]] = ..., responses: _Optional[_Iterable[str]] = ...) -> None: ...

class SuggestComparisonsRequest(_message.Message):
    __slots__ = ("candidates", "k")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    k: int
    def __init__(self, candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., k: _Optional[int] = ...) -> None: ...

class Suggestion(_message.Message):
    __slots__ = ("candidate_id", "index_a", "index_b", "response_a", "response_b", "prob", "score", "disagreement", "uncertainty", "prompt_text", "prompt_messages")
    CANDIDATE_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_A_FIELD_NUMBER: _ClassVar[int]
    INDEX_B_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_A_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_B_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DISAGREEMENT_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    candidate_id: str
    index_a: int
    index_b: int
    response_a: str
    response_b: str
    prob: float
    score: float
    disagreement: float
    uncertainty: float
    prompt_text: str
    prompt_messages: _reward_pb2.Conversation
    def __init__(self, candidate_id: _Optional[str] = ..., index_a: _Optional[int] = ..., index_b: _Optional[int] = ..., response_a: _Optional[str] = ..., response_b: _Optional[str] = ..., prob: _Optional[float] = ..., score: _Optional[float] = ..., disagreement: _Optional[float] = ..., uncertainty: _Optional[float] = ..., prompt_text: _Optional[str] = ..., prompt_messages: _Optional[_Union[_reward_pb2.Conversation, _Mapping]] = ...) -> None: ...

class SuggestComparisonsResponse(_message.Message):
    __slots__ = ("suggestions", "model_version")
    SUGGESTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    suggestions: _containers.RepeatedCompositeFieldContainer[Suggestion]
    model_version: str
    def __init__(self, suggestions: _Optional[_Iterable[_Union[Suggestion, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class LabelerReportRequest(_message.Message):
    __slots__ = ("tag",)
    TAG_FIELD_NUMBER: _ClassVar[int]
    tag: str
    def __init__(self, tag: _Optional[str] = ...) -> None: ...

class LabelerStats(_message.Message):
    __slots__ = ("labeler", "kind", "volume", "agreement_with_model", "agreement_with_others", "shared_items", "self_consistency", "repeated_items", "flagged", "reason")
    LABELER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_WITH_MODEL_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_WITH_OTHERS_FIELD_NUMBER: _ClassVar[int]
    SHARED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    SELF_CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    REPEATED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    labeler: str
    kind: str
    volume: int
    agreement_with_model: float
    agreement_with_others: float
    shared_items: int
    self_consistency: float
    repeated_items: int
    flagged: bool
    reason: str
    def __init__(self, labeler: _Optional[str] = ..., kind: _Optional[str] = ..., volume: _Optional[int] = ..., agreement_with_model: _Optional[float] = ..., agreement_with_others: _Optional[float] = ..., shared_items: _Optional[int] = ..., self_consistency: _Optional[float] = ..., repeated_items: _Optional[int] = ..., flagged: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class LabelerReportResponse(_message.Message):
    __slots__ = ("labelers", "model_version")
    LABELERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    labelers: _containers.RepeatedCompositeFieldContainer[LabelerStats]
    model_version: str
    def __init__(self, labelers: _Optional[_Iterable[_Union[LabelerStats, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class ExportPreferencesRequest(_message.Message):
    __slots__ = ("kind", "since_unix", "tag", "labeler")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    LABELER_FIELD_NUMBER: _ClassVar[int]
    kind: str
    since_unix: float
    tag: str
    labeler: str
    def __init__(self, kind: _Optional[str] = ..., since_unix: _Optional[float] = ..., tag: _Optional[str] = ..., labeler: _Optional[str] = ...) -> None: ...

class ExportPreferencesResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, rows: _Optional[_Iterable[str]] = ...) -> None: ...
