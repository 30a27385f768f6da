"""rmserve client SDK: score samples with a remote reward-model ensemble.

    from rmserve.client import RewardClient

    with RewardClient("localhost:50051", timeout=30) as client:
        results = client.score([{"prompt": "Hi", "response": "Hello!"}])
        print(results[0].reward, results[0].std, results.arrays().conservative)

`RewardClient` (blocking) and `AsyncRewardClient` (asyncio) share one core
(`_core`): the same validation, chunking, retries and result types. Only
grpcio, protobuf and numpy are needed; nothing here imports torch.
"""

from rmserve.client._core import ClientOptions
from rmserve.client.admin import Activation, ModelVersion, TrainProgress
from rmserve.client.async_client import AsyncRewardClient
from rmserve.client.errors import (
    AlreadyExistsError,
    AuthenticationError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RewardServiceError,
    UnavailableError,
    from_rpc_error,
)
from rmserve.client.labels import LabelerStats, SubmitResult, Suggestion
from rmserve.client.runs import RunStatus, RunStep
from rmserve.client.sync import RewardClient
from rmserve.client.trl import as_trl_reward_func
from rmserve.client.types import (
    CompareResult,
    ModelInfo,
    ScoreArrays,
    ScoreResult,
    ScoreResults,
    as_arrays,
)

__all__ = [
    "Activation",
    "AlreadyExistsError",
    "AsyncRewardClient",
    "AuthenticationError",
    "ClientOptions",
    "CompareResult",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalServerError",
    "InvalidRequestError",
    "LabelerStats",
    "ModelInfo",
    "ModelVersion",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RewardClient",
    "RewardServiceError",
    "RunStatus",
    "RunStep",
    "ScoreArrays",
    "ScoreResult",
    "ScoreResults",
    "SubmitResult",
    "Suggestion",
    "TrainProgress",
    "UnavailableError",
    "as_arrays",
    "as_trl_reward_func",
    "from_rpc_error",
]
