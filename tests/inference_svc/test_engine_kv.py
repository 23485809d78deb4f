"""Session reuse, prefix caching, the KV budget and batching, through the real server."""

from __future__ import annotations

import threading

import grpc
import pytest

from autoglm.control.v1 import control_service_pb2 as cpb
from autoglm.control.v1 import control_service_pb2_grpc as cgrpc
from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.conftest import png_bytes, start_server

HISTORY = "The phone shows a settings screen with Wi-Fi, Bluetooth and battery. " * 6


def user(text: str, image: bytes | None = None) -> pb.Message:
    parts = [pb.Part(text=text)]
    if image:
        parts.append(pb.Part(image=pb.Image(data=image, mime_type="image/png")))
    return pb.Message(role=pb.ROLE_USER, parts=parts)


def assistant(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_ASSISTANT, parts=[pb.Part(text=text)])


def generate(stub, messages, *, session: str = "", tokens: int = 8, seed: int = 1):
    responses = list(stub.Generate(pb.GenerateRequest(
        messages=messages, session_id=session,
        sampling=pb.SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, seed=seed,
                                   temperature=0))))
    return "".join(r.text_delta for r in responses), responses[-1].final


@pytest.fixture
def server(tiny_bundle, tmp_path):
    process = start_server(tmp_path / "s", tiny_bundle, "--kv-budget-mb", "0.5")
    yield process
    process.terminate()


def channels(server):
    public = grpc.insecure_channel(server.target)
    control = grpc.insecure_channel(server.control_target)
    return public, control, pb_grpc.InferenceServiceStub(public), cgrpc.ControlServiceStub(control)


def status(control) -> cpb.MemoryStatus:
    return control.GetMemoryStatus(cpb.GetMemoryStatusRequest()).status


def test_a_session_turn_reuses_the_previous_turns_kv_and_gives_the_same_text(server):
    public, ctl, stub, control = channels(server)
    with public, ctl:
        turn1 = [user(HISTORY + " What is on screen?", png_bytes())]
        reply, first = generate(stub, turn1, session="agent-1")
        assert first.usage.cached_prompt_tokens == 0
        turn2 = [*turn1, assistant(reply), user("Open Wi-Fi.")]
        text, second = generate(stub, turn2, session="agent-1")
        assert second.usage.cached_prompt_tokens >= first.usage.prompt_tokens - 1
        assert second.usage.cached_prompt_tokens < second.usage.prompt_tokens
        # the same prompt computed from scratch gives the same greedy text
        control.TrimKvCache(cpb.TrimKvCacheRequest(policy=cpb.TRIM_POLICY_ALL_IDLE))
        fresh, cold = generate(stub, turn2, session="agent-2")
        assert cold.usage.cached_prompt_tokens == 0
        assert fresh == text


def test_prefix_cache_serves_requests_without_a_session_id(server):
    public, ctl, stub, _ = channels(server)
    with public, ctl:
        turn1 = [user(HISTORY + " Step 1.")]
        reply, _ = generate(stub, turn1)
        _, second = generate(stub, [*turn1, assistant(reply), user("Step 2.")])
        assert second.usage.cached_prompt_tokens > 0
        # a different image at the same place must not reuse the cached image positions
        generate(stub, [user("Look:", png_bytes(color=(1, 2, 3)))])
        _, other = generate(stub, [user("Look:", png_bytes(color=(200, 2, 3)))])
        usage = other.usage
        assert usage.cached_prompt_tokens < usage.prompt_tokens - usage.image_tokens


def test_end_session_frees_its_kv_and_unknown_sessions_are_not_found(server):
    public, ctl, stub, control = channels(server)
    with public, ctl:
        generate(stub, [user(HISTORY)], session="to-end")
        held = {s.session_id: s.bytes for s in status(control).sessions}
        assert held["to-end"] > 0
        freed = stub.EndSession(pb.EndSessionRequest(session_id="to-end")).freed_bytes
        assert freed == held["to-end"]
        assert "to-end" not in {s.session_id for s in status(control).sessions}
        with pytest.raises(grpc.RpcError) as info:
            stub.EndSession(pb.EndSessionRequest(session_id="to-end"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_more_sessions_than_the_budget_holds_never_fail_and_stay_within_budget(server):
    public, ctl, stub, control = channels(server)
    with public, ctl:
        budget = status(control).kv_budget_bytes
        peak = 0
        for i in range(40):
            _, final = generate(stub, [user(f"{i} " + HISTORY)], session=f"s{i}", tokens=16)
            assert final.finish_reason == pb.FINISH_REASON_LENGTH
            now = status(control)
            peak = max(peak, now.kv_bytes)
            assert now.kv_bytes <= budget
        sessions = status(control).sessions
        assert 0 < len(sessions) < 40  # older sessions were evicted to make room
        assert "s39" in {s.session_id for s in sessions}  # the newest survives
        assert peak > budget // 2


def test_a_request_larger_than_the_whole_budget_is_resource_exhausted(server):
    public, ctl, stub, _ = channels(server)
    with public, ctl:
        request = pb.GenerateRequest(messages=[user("hi")],
                                     sampling=pb.SamplingParams(max_new_tokens=1900))
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(request))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "KV" in info.value.details()
        assert dict(info.value.trailing_metadata()).get("retry-after-ms") is not None


def test_requests_joining_a_running_batch_generate_what_they_would_alone(server):
    """Five requests sent while another one decodes join its batch: they all finish while
    it still runs (the model loop decodes every running sequence in each step), and each
    says what it says alone."""
    public, ctl, stub, control = channels(server)
    with public, ctl:
        prompts = [[user(f"prompt number {i} " * (i + 1))] for i in range(5)]
        alone = [generate(stub, p, tokens=24, seed=7)[0] for p in prompts]
        control.TrimKvCache(cpb.TrimKvCacheRequest(policy=cpb.TRIM_POLICY_ALL_IDLE))
        running = stub.Generate(long_greedy(0, 400, "already running"),
                                metadata=[("x-request-id", "already-running")])
        next(running)  # it is decoding now
        together: dict[int, str] = {}

        def run(i: int) -> None:
            together[i] = generate(stub, prompts[i], tokens=24, seed=7)[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        still_running = [r.request_id for r in status(control).requests]
        running.cancel()
        assert still_running == ["already-running"]  # the batch they joined goes on
        assert [together[i] for i in range(5)] == alone
    preempted = [e["request_id"] for e in server.log_lines() if e.get("event") == "preempted"]
    assert "already-running" not in preempted  # it ran beside them throughout


def test_cancelled_and_finished_requests_leave_no_request_kv(server):
    public, ctl, stub, control = channels(server)
    with public, ctl:
        call = stub.Generate(pb.GenerateRequest(
            messages=[user("go")], sampling=pb.SamplingParams(max_new_tokens=600,
                                                              min_new_tokens=600)))
        next(call)
        assert status(control).requests
        call.cancel()
        generate(stub, [user("short")])
        final = status(control)
        assert not final.requests
        # nothing is held for a request; cached blocks and sessions are all there is
        assert final.kv_bytes == final.cached_kv_bytes + sum(s.bytes for s in final.sessions)


def long_greedy(priority: int, tokens: int, text: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[user(text)], priority=priority,
        sampling=pb.SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0))


def test_a_higher_priority_request_preempts_and_the_preempted_one_resumes(server):
    public, ctl, stub, control = channels(server)
    with public, ctl:
        expected = "".join(r.text_delta for r in stub.Generate(long_greedy(0, 600, "low")))
        control.TrimKvCache(cpb.TrimKvCacheRequest(policy=cpb.TRIM_POLICY_ALL_IDLE))
        low = stub.Generate(long_greedy(0, 600, "low"))
        first = next(low)
        high = list(stub.Generate(long_greedy(5, 600, "high")))
        assert high[-1].final.usage.completion_tokens == 600
        rest = list(low)
        assert rest[-1].final.usage.completion_tokens == 600
        assert first.text_delta + "".join(r.text_delta for r in rest) == expected
    events = [e["event"] for e in server.log_lines()]
    assert "preempted" in events and "resumed" in events


def test_requests_that_outgrow_the_budget_together_are_preempted_and_lose_nothing(server):
    """Admission counts what is used: both start at once; as they grow past the budget the
    newest is preempted, recomputed later, and still says exactly what it says alone."""
    public, ctl, stub, control = channels(server)
    with public, ctl:
        alone = {}
        for name in ("a", "b"):
            alone[name] = "".join(r.text_delta for r in stub.Generate(long_greedy(0, 600, name)))
            control.TrimKvCache(cpb.TrimKvCacheRequest(policy=cpb.TRIM_POLICY_ALL_IDLE))
        results: dict[str, list[pb.GenerateResponse]] = {}

        def run(name: str) -> None:
            results[name] = list(stub.Generate(long_greedy(0, 600, name)))

        threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for name in ("a", "b"):
            assert results[name][-1].final.usage.completion_tokens == 600
            assert "".join(r.text_delta for r in results[name]) == alone[name]
    lines = server.log_lines()
    preempted = [e for e in lines if e.get("event") == "preempted"]
    assert preempted and {e["reason"] for e in preempted} == {"kv_budget"}
    assert "resumed" in [e["event"] for e in lines]


def test_media_needing_more_encoder_activations_than_allowed_are_refused(tiny_bundle, tmp_path):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    server = start_server(tmp_path / "a", tiny_bundle, "--activation-budget-mb", "0.01")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(pb.GenerateRequest(messages=[user("see", png_bytes())])))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            detail = error_details_pb2.ErrorInfo()
            rpc_status.from_call(info.value).details[0].Unpack(detail)
            assert detail.metadata["resource"] == "encoder_activations"
            _, final = generate(stub, [user("text only is fine")])
            assert final.usage.completion_tokens == 8
    finally:
        server.terminate()


def test_n_choices_share_the_prompts_blocks_and_each_samples_as_seed_plus_i(server):
    """The account shows blocks shared while the choices decode; choice i says what a
    single request with seed + i says (through the Python client's `choices`)."""
    from autoglm_client import InferenceClient, Sampling
    from autoglm_client import user as client_user

    conversation = [client_user(HISTORY + " Describe the screen.")]
    sampling = Sampling(max_new_tokens=12, min_new_tokens=12, temperature=1.0, top_p=1.0,
                        seed=21)
    with InferenceClient(server.target, timeout=120) as client:
        singles = [client.generate(conversation, Sampling(**{**_fields(sampling),
                                                              "seed": 21 + i}))
                   for i in range(3)]
        together = client.generate(conversation, sampling, n=3)
    assert [c.text for c in together.choices] == [s.text for s in singles]
    assert [c.index for c in together.choices] == [0, 1, 2]
    assert together.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert together.usage.prompt_tokens == singles[0].usage.prompt_tokens

    public, ctl, stub, control = channels(server)
    with public, ctl:
        call = stub.Generate(pb.GenerateRequest(
            messages=[user(HISTORY + " Go on.")], n=3,
            sampling=pb.SamplingParams(max_new_tokens=300, min_new_tokens=300,
                                       temperature=0)))
        shared, indexes, ends, final = 0, set(), [], None
        for response in call:
            if response.HasField("final"):
                final = response.final
                break
            indexes.add(response.index)
            if response.HasField("choice_end"):
                ends.append(response.choice_end.index)
            elif not shared:
                shared = status(control).shared_kv_bytes
        assert shared > 0  # the prompt's blocks, read by all three choices
        assert indexes == {0, 1, 2} and sorted(ends) == [0, 1, 2]
        assert [c.completion_tokens for c in final.choices] == [300, 300, 300]
        assert final.usage.completion_tokens == 900
        assert not status(control).requests


def _fields(sampling) -> dict:
    return {name: getattr(sampling, name) for name in sampling.__slots__}
