"""Property-based fuzzing of every method of every rmserve service (hypothesis).

Requests are generated from the protos' descriptors, so a new method or field is
fuzzed without a change here: any unicode (control characters, the tokenizer's own
special tokens, RTL marks, NUL) and huge strings, empty and over-long lists, unset and
empty oneofs, extreme and negative numbers, NaN and infinities (a NaN λ), token ids
outside the vocabulary. Raw bytes go to every method too: random bytes, another
method's request, two messages merged on the wire (a oneof set twice).

Every call must end OK or with a precise status (never INTERNAL or UNKNOWN, never a
dead server): the codes each method may answer are listed below, and a valid Score
still succeeds after each test.

Profiles: `ci` (default; derandomized, so CI is reproducible) and `long`
(HYPOTHESIS_PROFILE=long, random, 2000 examples per test); FUZZ_EXAMPLES overrides
the number of examples of either. bench/results/fuzz-2026-12-06.md records a long run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rmserve.service.data.train_config import TrainConfig
from rmserve.service.server.background import BackgroundServer
from rmserve.service.server.config import ServerConfig
from rmserve.service.server.jobs import TrainingJob
from rmserve.v1 import admin_pb2 as apb
from rmserve.v1 import label_pb2 as lpb
from rmserve.v1 import reward_pb2 as pb

_COMMON = dict(
    deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
settings.register_profile("ci", max_examples=30, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=2000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
if os.environ.get("FUZZ_EXAMPLES"):
    settings.register_profile("fuzz-override", settings(max_examples=int(os.environ["FUZZ_EXAMPLES"])))
    settings.load_profile("fuzz-override")

API_KEY = "k-fuzz-all-scopes"
AUTH = (("authorization", f"Bearer {API_KEY}"),)
MAX_MESSAGE_BYTES = 4 << 20
MAX_SAMPLES = 16
# Train may read this file (the server's --data-root): a path the strategies can name
DATA_FILE = Path(tempfile.gettempdir()) / f"rmserve-fuzz-{os.getpid()}" / "prefs.jsonl"
VOCAB = 300  # the tiny test tokenizer's (tests/helpers.py: make_tokenizer)

C = grpc.StatusCode
SERVICES = [pb.DESCRIPTOR.services_by_name["RewardService"], apb.DESCRIPTOR.services_by_name["AdminService"],
            lpb.DESCRIPTOR.services_by_name["LabelService"]]
# What each method may answer besides OK. Anything else (INTERNAL, UNKNOWN, UNAVAILABLE, ...) is a bug.
ALLOWED: dict[str, set[grpc.StatusCode]] = {
    "Score": {C.INVALID_ARGUMENT},
    "ScoreStream": {C.INVALID_ARGUMENT},  # per chunk; the stream itself ends OK
    "ScoreGroups": {C.INVALID_ARGUMENT},
    "Compare": {C.INVALID_ARGUMENT},
    "GetModelInfo": set(),
    "GetRunStatus": {C.INVALID_ARGUMENT, C.NOT_FOUND},
    "ListRuns": set(),
    "Train": {C.INVALID_ARGUMENT, C.FAILED_PRECONDITION},
    "ListModels": set(),
    "ActivateModel": {C.INVALID_ARGUMENT, C.NOT_FOUND},
    "SubmitPreferences": {C.INVALID_ARGUMENT, C.ALREADY_EXISTS},
    "SuggestComparisons": {C.INVALID_ARGUMENT},
    "LabelerReport": set(),
    "ExportPreferences": {C.INVALID_ARGUMENT},
}


@dataclass(frozen=True)
class Method:
    path: str
    name: str
    request: type[Message]
    response: type[Message]
    client_streaming: bool
    server_streaming: bool

    def __str__(self) -> str:
        return self.path


METHODS = [
    Method(f"/{s.full_name}/{m.name}", m.name, message_factory.GetMessageClass(m.input_type),
           message_factory.GetMessageClass(m.output_type), m.client_streaming, m.server_streaming)
    for s in SERVICES for m in s.methods
]


def test_every_method_has_its_allowed_codes():
    assert {m.name for m in METHODS} == set(ALLOWED)


# -- strategies ------------------------------------------------------------------------------

# the test tokenizer's special tokens and template markers, invisible and direction characters
SPECIAL_TEXT = ["", " ", "\x00", "\n", "\r\n", "\t", "\ufeff", "\u202e", "\u200b", "\U0010ffff", "<pad>", "<eos>",
                "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>hi<|end|>\n<|assistant|>",
                "{{ messages }}", "{% for m in messages %}", "🙂" * 3, "\x1b[31m"]
ROLES = ["user", "assistant", "system", "tool"]


def texts(huge: bool = True) -> st.SearchStrategy[str]:
    """Mostly short text of any code points (control characters included) or special strings;
    one in ten far over every token limit (the encoder must refuse or truncate it)."""
    short = st.one_of(st.text(st.characters(codec="utf-8"), max_size=24), st.sampled_from(SPECIAL_TEXT))
    if not huge:
        return short
    big = st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "\x00", "<|end|>", "🙂", "ab "]),
                    st.integers(2_000, 60_000))
    return st.integers(0, 9).flatmap(lambda i: big if i == 9 else short)


def ints(bits: int) -> st.SearchStrategy[int]:
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return st.one_of(st.integers(-3, 10), st.sampled_from([lo, hi, -1, 0, 1, VOCAB - 1, VOCAB, 2**31 - 1]),
                     st.integers(lo, hi))


def doubles() -> st.SearchStrategy[float]:
    return st.one_of(st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0, 1e308, -1e308,
                                                   5e-324, 0.5, 1.0]))


def json_values() -> st.SearchStrategy:
    leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
    return st.recursive(leaves, lambda v: st.lists(v, max_size=3) | st.dictionaries(st.text(max_size=8), v, max_size=3),
                        max_leaves=10)


def options_json() -> st.SearchStrategy[str]:
    """Train's options_json: TrainConfig's own fields with any JSON value, broken and deep JSON."""
    keys = st.sampled_from([*TrainConfig.__dataclass_fields__, "from_store", "store_filters", "unknown"])
    objects = st.dictionaries(keys, json_values(), max_size=5).map(json.dumps)
    deep = st.integers(1, 200_000).map(lambda n: "[" * n + "]" * n)
    plausible = st.one_of(st.sampled_from(["", '{"from_store": true}', '{"from_store": true, "epochs": 1}',
                                          '{"head_solver": "lbfgs", "calib_frac": 0}']), objects)
    return mostly(plausible, st.one_of(texts(huge=False), deep))


def mostly(valid: st.SearchStrategy, anything: st.SearchStrategy) -> st.SearchStrategy:
    """`valid` three times in four: random values alone would rarely get past the first check."""
    return st.integers(0, 3).flatmap(lambda i: anything if i == 3 else valid)  # shrinks toward valid


# (message, field) -> strategy (always drawn: include the default where it matters)
FIELD_OVERRIDES = {
    ("Message", "role"): mostly(st.sampled_from(ROLES), texts(huge=False)),
    ("TokenIds", "ids"): mostly(st.lists(st.integers(0, VOCAB - 1), max_size=80), st.lists(ints(32), max_size=80)),
    ("ScoreOptions", "run_id"): mostly(st.sampled_from(["", "fuzz-run", "fuzz-run-2"]), texts()),
    ("Preference", "labeler_kind"): mostly(st.sampled_from(["", "human", "ai"]), texts(huge=False)),
    ("Preference", "labeler"): mostly(st.sampled_from(["fuzz", "fuzz-2"]), texts(huge=False)),
    # fresh ids mostly; a few reused ones (a retry, or a changed label: ALREADY_EXISTS)
    ("Preference", "id"): mostly(st.uuids().map(str), st.one_of(st.sampled_from(["a", "b"]), texts(huge=False))),
    ("Preference", "responses"): mostly(st.lists(texts(), min_size=2, max_size=4), st.lists(texts(), max_size=4)),
    ("Preference", "choice"): mostly(st.integers(0, 3), ints(32)),
    ("Preference", "tie"): mostly(st.just(True), st.booleans()),
    ("Ranking", "ranks"): mostly(st.lists(st.integers(0, 3), max_size=4), st.lists(ints(32), max_size=6)),
    ("Candidate", "responses"): mostly(st.lists(texts(), min_size=2, max_size=4), st.lists(texts(), max_size=4)),
    ("Group", "completions"): st.lists(texts(), max_size=4),
    ("ExportPreferencesRequest", "kind"): mostly(st.sampled_from(["", "human", "ai"]), texts(huge=False)),
    ("TrainRequest", "options_json"): options_json(),
    ("TrainRequest", "data_path"): mostly(st.sampled_from(["", str(DATA_FILE), str(DATA_FILE.parent), str(DATA_FILE) + "\x00",
                                                           str(DATA_FILE.parent / ".." / "x"), "/etc/passwd"]), texts()),
    ("TrainRequest", "dev_path"): mostly(st.sampled_from(["", str(DATA_FILE)]), texts()),
    ("TrainRequest", "kind"): mostly(st.sampled_from(["", "heads", "members"]), texts(huge=False)),
    ("TrainRequest", "backbone"): mostly(st.just(""), texts(huge=False)),
    **{("TrainRequest", f): mostly(st.integers(0, 3), ints(32)) for f in ("num_heads", "finetune_layers", "epochs")},
    ("TrainRequest", "max_tokens"): mostly(st.integers(0, 512), ints(32)),
    ("TrainRequest", "lr"): mostly(st.one_of(st.just(0.0), st.floats(1e-5, 1.0)), doubles()),
    ("ActivateModelRequest", "version"): st.one_of(st.sampled_from(["v1", ".", "..", "../x", "a" * 200, "ACTIVE"]),
                                                   texts(huge=False)),
    ("GetRunStatusRequest", "run_id"): mostly(st.sampled_from(["", "fuzz-run", "fuzz-run-2"]), texts()),
    ("SuggestComparisonsRequest", "k"): mostly(st.integers(1, 5), ints(32)),
}
# repeated fields' sizes: a few over the server's per-request cap where there is one
REPEATED_MAX = {("ScoreRequest", "samples"): MAX_SAMPLES + 2, ("ScoreStreamRequest", "samples"): MAX_SAMPLES + 2,
                ("SubmitPreferencesRequest", "items"): 3, ("SuggestComparisonsRequest", "candidates"): 3}
_SCALARS = {
    FieldDescriptor.TYPE_STRING: texts, FieldDescriptor.TYPE_BOOL: st.booleans, FieldDescriptor.TYPE_DOUBLE: doubles,
    FieldDescriptor.TYPE_FLOAT: doubles, FieldDescriptor.TYPE_INT32: lambda: ints(32),
    FieldDescriptor.TYPE_INT64: lambda: ints(64), FieldDescriptor.TYPE_BYTES: lambda: st.binary(max_size=64),
}
_CACHE: dict[str, st.SearchStrategy] = {}


def _value(d: Descriptor, f: FieldDescriptor) -> st.SearchStrategy:
    if (d.name, f.name) in FIELD_OVERRIDES:
        return FIELD_OVERRIDES[(d.name, f.name)]
    one = messages(f.message_type) if f.type == FieldDescriptor.TYPE_MESSAGE else _SCALARS[f.type]()
    if not f.is_repeated:
        return one
    return mostly(st.lists(one, min_size=1, max_size=3), st.lists(one, max_size=REPEATED_MAX.get((d.name, f.name), 5)))


def messages(d: Descriptor) -> st.SearchStrategy[Message]:
    """Any message of type `d`: each field set or not; of a oneof, none or one member
    (possibly an empty message); proto3 `optional` fields set or absent."""
    if d.full_name in _CACHE:
        return _CACHE[d.full_name]
    cls = message_factory.GetMessageClass(d)
    oneofs = [o for o in d.oneofs if len(o.fields) > 1]  # one-field oneofs are proto3 `optional`
    plain = [f for f in d.fields if f.containing_oneof is None or len(f.containing_oneof.fields) == 1]

    @st.composite
    def build(draw) -> Message:
        msg = cls()
        chosen = [draw(st.sampled_from([*o.fields, *o.fields, *o.fields, None])) for o in oneofs]
        for f in plain + [f for f in chosen if f is not None]:
            always = f.is_repeated or (d.name, f.name) in FIELD_OVERRIDES  # (they include the empty value)
            if f.containing_oneof is None and not always and not draw(st.booleans()):
                continue  # left at its default
            if f.containing_oneof is not None and len(f.containing_oneof.fields) == 1 and not draw(st.booleans()):
                continue  # optional field absent
            value = draw(_value(d, f))
            if f.is_repeated:
                getattr(msg, f.name).extend(value)
            elif f.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, f.name).CopyFrom(value)
            else:
                setattr(msg, f.name, value)
        return msg

    _CACHE[d.full_name] = build()
    return _CACHE[d.full_name]


def raw_requests() -> st.SearchStrategy[bytes]:
    """Bytes for any method: random, any method's request, or two requests merged on the wire."""
    any_request = st.sampled_from(METHODS).flatmap(lambda m: messages(m.request.DESCRIPTOR)).map(
        lambda msg: msg.SerializeToString())
    return st.one_of(st.binary(max_size=256), any_request, st.tuples(any_request, any_request).map(b"".join),
                     st.binary(min_size=1, max_size=8).map(lambda b: b"\x0a\xff\xff\xff\xff\x0f" + b))


# -- the server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_ensemble, tmp_path_factory):
    """One server for the module: API keys with every scope (the auth path runs on every call),
    a data root holding a small preference file, a preference store of its own."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "keys.json").write_text(json.dumps({API_KEY: ["score", "label", "admin"]}))
    DATA_FILE.parent.mkdir(parents=True, exist_ok=True)
    DATA_FILE.write_text(json.dumps({"prompt": "hi", "chosen": "hello", "rejected": "go away"}) + "\n")
    config = ServerConfig(
        model=str(tiny_ensemble), port=0, metrics_port=None, registry=str(root / "registry"),
        labels_db=str(root / "labels.sqlite3"), api_keys=str(root / "keys.json"), data_roots=[str(DATA_FILE.parent)],
        max_samples_per_request=MAX_SAMPLES, max_message_bytes=MAX_MESSAGE_BYTES, runs_file="",
        max_tokens=256,  # the tiny model's 64 would refuse most random text before it reaches the engine
    )
    s = BackgroundServer(config).start()
    jobs = s.server.admin.jobs

    def no_training(cfg, *, version, staging, final, activate):
        """A Train that passed validation ends at once: the fuzzer must not start real jobs."""
        job = TrainingJob(version=version, staging=staging, final=final, activate=activate)
        for q in list(jobs._listeners):
            q.put_nowait({"event": "done", "phase": "", "message": "fuzz: no job started"})
            q.put_nowait(None)
        job.done.set()
        return job

    jobs.start = no_training
    with grpc.insecure_channel(s.address) as ch:  # a stored label: Train from the store gets past its first check
        submit = ch.unary_unary("/rmserve.v1.LabelService/SubmitPreferences",
                                request_serializer=lpb.SubmitPreferencesRequest.SerializeToString,
                                response_deserializer=lpb.SubmitPreferencesResponse.FromString)
        submit(lpb.SubmitPreferencesRequest(items=[lpb.Preference(
            id="seed", prompt_text="hi", responses=["hello", "go away"], choice=0, labeler="seed")]),
            timeout=60, metadata=AUTH)
    yield s
    s.stop()
    shutil.rmtree(DATA_FILE.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]) as ch:
        yield ch


GOOD = pb.ScoreRequest(samples=[pb.Sample(text=pb.PromptResponse(prompt="How do I bake bread?", response="Knead."))])


@pytest.fixture(autouse=True)
def still_serving(server, channel):
    """After each test: health SERVING, a valid request scored, and no call still counted as
    work in flight (a leak there would make every SIGTERM wait out the grace period)."""
    yield
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    score = channel.unary_unary("/rmserve.v1.RewardService/Score", request_serializer=pb.ScoreRequest.SerializeToString,
                                response_deserializer=pb.ScoreResponse.FromString)
    assert len(score(GOOD, timeout=60, metadata=AUTH).results) == 1
    work = server.server.state.work
    end = time.monotonic() + 30  # a call's count ends when gRPC reports it done, just after the answer
    while work.count and time.monotonic() < end:
        time.sleep(0.01)
    assert work.count == 0


# -- calling ---------------------------------------------------------------------------------


def call(channel: grpc.Channel, method: Method, chunks: list[bytes]) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """Send request bytes; (final status, its details, response bytes)."""
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, True): channel.stream_stream}[(method.client_streaming, method.server_streaming)]
    rpc = kind(method.path, request_serializer=None, response_deserializer=None)
    try:
        if method.client_streaming:
            out = list(rpc(iter(chunks), timeout=120, metadata=AUTH))
        elif method.server_streaming:
            out = list(rpc(chunks[0], timeout=120, metadata=AUTH))
        else:
            out = [rpc(chunks[0], timeout=120, metadata=AUTH)]
    except grpc.RpcError as e:
        return e.code(), e.details() or "", []
    return C.OK, "", out


def parses(cls: type[Message], data: bytes) -> bool:
    try:
        cls.FromString(data)
    except DecodeError:
        return False
    return True


def check_results(results) -> None:
    for r in results:
        assert math.isfinite(r.reward) and math.isfinite(r.std) and math.isfinite(r.min), r
        assert r.std >= 0 and r.min <= r.reward + 1e-4, r


def check(method: Method, chunks: list[bytes], code: grpc.StatusCode, details: str, out: list[bytes]) -> None:
    """The call's outcome is OK or one of the method's precise statuses, with a message."""
    too_big = any(len(c) > MAX_MESSAGE_BYTES for c in chunks)
    event(code.name)  # the spread of outcomes, in --hypothesis-show-statistics
    if code != C.OK:
        allowed = ALLOWED[method.name] | ({C.RESOURCE_EXHAUSTED} if too_big else set())
        if not method.client_streaming and not parses(method.request, chunks[0]):
            allowed = {C.INVALID_ARGUMENT}
            assert f"malformed {method.request.DESCRIPTOR.name}" in details, details
        assert code in allowed, f"{method}: {code.name}: {details}"
        assert details, f"{method}: {code.name} without a message"
        return
    assert not too_big
    responses = [method.response.FromString(b) for b in out]
    if method.name == "ScoreStream":
        assert len(responses) == len(chunks)
        for chunk, resp in zip(chunks, responses, strict=True):
            if resp.HasField("error"):
                assert C.INVALID_ARGUMENT.value[0] == resp.error.code, resp.error
                assert resp.error.message
                if not parses(method.request, chunk):
                    assert "malformed ScoreStreamRequest" in resp.error.message
            else:
                check_results(resp.results)
    for resp in responses:
        if method.name in ("Score", "ScoreStream"):
            check_results(resp.results)
        elif method.name == "ScoreGroups":
            for g in resp.groups:
                check_results(g.results)
        elif method.name == "Compare":
            check_results([resp.a, resp.b])
            assert 0 <= resp.prob <= 1


# -- the properties ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS, ids=str)
@given(data=st.data())
def test_any_request_gets_ok_or_a_precise_status(channel, method, data):
    if method.client_streaming:
        chunks = data.draw(st.lists(messages(method.request.DESCRIPTOR), min_size=1, max_size=3))
    else:
        chunks = [data.draw(messages(method.request.DESCRIPTOR))]
    raw = [c.SerializeToString() for c in chunks]
    check(method, raw, *call(channel, method, raw))


@pytest.mark.parametrize("method", METHODS, ids=str)
@given(data=st.data())
def test_any_bytes_get_ok_or_a_precise_status(channel, method, data):
    n = data.draw(st.integers(1, 3)) if method.client_streaming else 1
    raw = [data.draw(raw_requests()) for _ in range(n)]
    check(method, raw, *call(channel, method, raw))


# -- what the fuzzer found (each was INTERNAL, or a status the caller could not read) ------------


def unary_call(channel: grpc.Channel, method: str, request: Message, response: type[Message]):
    rpc = channel.unary_unary(method, request_serializer=type(request).SerializeToString,
                              response_deserializer=response.FromString)
    return rpc(request, timeout=60, metadata=AUTH)


def status(channel: grpc.Channel, method: str, request: Message, response: type[Message]) -> tuple[grpc.StatusCode, str]:
    try:
        if method.endswith("/Train"):
            list(channel.unary_stream(method, request_serializer=type(request).SerializeToString,
                                      response_deserializer=response.FromString)(request, timeout=60, metadata=AUTH))
        else:
            unary_call(channel, method, request, response)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return C.OK, ""


def test_a_status_quoting_a_huge_input_still_reaches_the_caller(channel):
    """The message quoted a 12 kB sample id: the trailer passed the client's 8 KiB limit and the
    caller saw RESOURCE_EXHAUSTED "Stream removed" instead of the INVALID_ARGUMENT."""
    code, details = status(channel, "/rmserve.v1.RewardService/Score",
                           pb.ScoreRequest(samples=[pb.Sample(id="a" * 12_000)]), pb.ScoreResponse)
    assert code == C.INVALID_ARGUMENT and "has no input" in details and "characters cut" in details


@pytest.mark.parametrize("request_", [
    apb.TrainRequest(data_path="prefs\x00.jsonl"),      # ValueError: embedded null byte
    apb.TrainRequest(data_path=str(DATA_FILE.parent / ("x" * 5000))),  # OSError: file name too long
    apb.TrainRequest(options_json="[" * 100_000 + "]" * 100_000),  # RecursionError in json.loads
], ids=["nul-in-path", "long-path", "deep-json"])
def test_train_requests_that_raised_are_invalid_argument(channel, request_):
    code, details = status(channel, "/rmserve.v1.AdminService/Train", request_, apb.TrainProgress)
    assert code == C.INVALID_ARGUMENT, details


def test_a_stored_label_the_model_cannot_read_leaves_the_report_working(channel):
    """A label whose prompt has a role the model's template does not know (or a response over
    its token limit) is stored; LabelerReport then failed for everyone until it was deleted."""
    unreadable = lpb.Preference(id="unreadable-role", responses=["a", "b"], choice=0, labeler="fuzz-regression",
                                prompt_messages=pb.Conversation(messages=[pb.Message(role="robot", content="beep")]))
    too_long = lpb.Preference(id="unreadable-long", prompt_text="hi", responses=["ab " * 5000, "b"], tie=True,
                              labeler="fuzz-regression")
    unary_call(channel, "/rmserve.v1.LabelService/SubmitPreferences",
               lpb.SubmitPreferencesRequest(items=[unreadable, too_long]), lpb.SubmitPreferencesResponse)
    report = unary_call(channel, "/rmserve.v1.LabelService/LabelerReport", lpb.LabelerReportRequest(),
                        lpb.LabelerReportResponse)
    assert "fuzz-regression" in {s.labeler for s in report.labelers}


@pytest.mark.parametrize("timestamp", [math.nan, math.inf], ids=["nan", "inf"])
def test_a_label_with_a_timestamp_that_is_not_finite_is_invalid_argument(channel, timestamp):
    """NaN was stored as NULL: the store refused it and the caller got UNAVAILABLE, which the
    SDK retries in vain."""
    item = lpb.Preference(id=f"ts-{timestamp}", prompt_text="hi", responses=["a", "b"], choice=0, labeler="fuzz",
                          timestamp_unix=timestamp)
    code, details = status(channel, "/rmserve.v1.LabelService/SubmitPreferences",
                           lpb.SubmitPreferencesRequest(items=[item]), lpb.SubmitPreferencesResponse)
    assert code == C.INVALID_ARGUMENT and "timestamp_unix" in details


def test_an_export_since_nan_is_invalid_argument(channel):
    """It matched nothing, silently: a caller's NaN is a bug on its side, said as such."""
    rpc = channel.unary_stream("/rmserve.v1.LabelService/ExportPreferences",
                               request_serializer=lpb.ExportPreferencesRequest.SerializeToString,
                               response_deserializer=lpb.ExportPreferencesResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        list(rpc(lpb.ExportPreferencesRequest(since_unix=math.nan), timeout=60, metadata=AUTH))
    assert err.value.code() == C.INVALID_ARGUMENT and "since_unix" in err.value.details()
