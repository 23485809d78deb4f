"""Native GLM-4.1V checkpoints: the model object in-process, then through a real server."""

from __future__ import annotations

import asyncio
import gc
import io
import weakref
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, Glm4vForConditionalGeneration

from autoglm.control.v1 import control_service_pb2 as cpb
from autoglm.inference.v1 import inference_service_pb2 as pb
from inference_svc.engine.engine import Engine, EngineConfig
from inference_svc.errors import ModalityUnavailable
from inference_svc.model.checkpoints.glm4v_checkpoint import is_glm4v_checkpoint
from inference_svc.model.checkpoints.placement import bytes_by_device
from inference_svc.model.glm4v import Glm4vModel
from inference_svc.model.paged.kv_pool import RowSlots
from inference_svc.model.units import DISK
from inference_svc.types import (
    AudioPart,
    ChatMessage,
    Delta,
    GenerationRequest,
    ImagePart,
    SamplingParams,
    TextPart,
)
from tests.conftest import ServerProcess, png_bytes, running_server, wav_bytes
from tests.fixtures.tiny_models import write_tiny_glm4v_checkpoint
from tests.unit.test_engine_paged import preemption_runs, run, started

MAX_PIXELS = 1_003_520


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_glm4v_checkpoint(tmp_path_factory.mktemp("glm4v") / "tiny-glm4v")


@pytest.fixture(scope="module")
def model(checkpoint) -> Glm4vModel:
    return Glm4vModel(checkpoint)


def two_image_messages() -> list[ChatMessage]:
    return [ChatMessage("user", [
        TextPart("hello "),
        ImagePart(png_bytes(), "image/png", "messages[0].parts[1].image"),
        TextPart(" and "),
        ImagePart(png_bytes((64, 64), (0, 0, 255)), "image/png", "messages[0].parts[3].image"),
        TextPart(" what are these?"),
    ])]


def expected_image_tokens(checkpoint: Path, image_bytes: bytes) -> int:
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    grid = processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // processor.merge_size**2


# ---- the model object ---------------------------------------------------------------


def test_checkpoint_is_recognised_by_its_architecture(checkpoint, tiny_bundle):
    assert is_glm4v_checkpoint(checkpoint)
    assert not is_glm4v_checkpoint(tiny_bundle)


def test_plan_expands_each_image_to_its_feature_count(model, checkpoint):
    messages = two_image_messages()
    media = model.decode_media(messages, max_pixels=MAX_PIXELS)
    plan = model.plan(messages, media, enable_thinking=False)
    lengths = [expected_image_tokens(checkpoint, png_bytes()),
               expected_image_tokens(checkpoint, png_bytes((64, 64), (0, 0, 255)))]
    assert [s.length for s in plan.spans] == lengths
    begin, end = model.tokenizer.convert_tokens_to_ids(["<|begin_of_image|>", "<|end_of_image|>"])
    for span in plan.spans:
        assert plan.input_ids[span.start - 1] == begin
        assert plan.input_ids[span.start + span.length] == end
        assert set(plan.input_ids[span.start : span.start + span.length]) == {model.image_token_id}
    assert plan.input_ids.count(model.image_token_id) == sum(lengths)


def test_image_token_typed_by_a_user_does_not_become_an_image(model):
    messages = [ChatMessage("user", [TextPart("look <|image|> here")])]
    media = model.decode_media(messages, max_pixels=MAX_PIXELS)
    plan = model.plan(messages, media, enable_thinking=False)
    assert model.image_token_id not in plan.input_ids


def test_audio_part_is_refused_naming_the_part(model):
    messages = [ChatMessage("user", [TextPart("hear"), AudioPart("messages[0].parts[1].audio.wav",
                                                                wav=wav_bytes(0.2))])]
    with pytest.raises(ModalityUnavailable, match=r"messages\[0\]\.parts\[1\]\.audio"):
        model.decode_media(messages, max_pixels=MAX_PIXELS)


def reference_logits(checkpoint: Path, model: Glm4vModel, plan, media) -> torch.Tensor:
    """The checkpoint's own forward over the prompt, pixels in (its rope, its tower)."""
    reference = Glm4vForConditionalGeneration.from_pretrained(checkpoint).eval()
    ids = torch.tensor([plan.input_ids])
    with torch.inference_mode():
        return reference(
            input_ids=ids, attention_mask=torch.ones_like(ids),
            pixel_values=torch.cat(media.pixel_values), image_grid_thw=torch.tensor(media.grids),
            mm_token_type_ids=(ids == model.image_token_id).int(),
        ).logits[0]


def contiguous(start: int, stop: int, *, first_block: int = 1, size: int = 16) -> RowSlots:
    """Positions [start, stop) of a sequence whose blocks are first_block, first_block+1..."""
    def slots(a: int, b: int) -> torch.Tensor:
        return torch.arange(a, b) + first_block * size
    return RowSlots(slots(start, stop), slots(0, stop))


def paged_prefill(model: Glm4vModel, pool, plan, media, *, cached: int = 0) -> torch.Tensor:
    """Last-token logits of feeding the prompt from `cached` on, in one pass."""
    inputs = model.prompt_inputs(plan, media, cached=cached)
    positions = None if inputs.positions is None else [inputs.positions]
    [logits] = model.forward_paged(pool, [contiguous(cached, len(plan.input_ids))],
                                   [inputs.embeds], positions)
    return logits


def test_paged_prefill_matches_the_models_own_pixel_path(model, checkpoint):
    messages = two_image_messages()
    media = model.decode_media(messages, max_pixels=MAX_PIXELS)
    plan = model.plan(messages, media, enable_thinking=False)
    expected = reference_logits(checkpoint, model, plan, media)[-1]
    pool = model.new_kv_pool(block_size=16, blocks=len(plan.input_ids) // 16 + 2)
    torch.testing.assert_close(paged_prefill(model, pool, plan, media), expected)


@pytest.mark.parametrize("where", ["text_before_images", "inside_first_image",
                                   "between_images", "after_images"])
def test_cached_prefix_gives_the_same_logits(model, where):
    """KV of any prefix, even one ending inside an image, continues exactly: the rest's
    embeddings and rope positions are those of the whole prompt from there on."""
    messages = two_image_messages()
    media = model.decode_media(messages, max_pixels=MAX_PIXELS)
    plan = model.plan(messages, media, enable_thinking=False)
    first, second = plan.spans
    cached = {"text_before_images": 3, "inside_first_image": first.start + first.length // 2,
              "between_images": second.start - 1,
              "after_images": second.start + second.length + 1}[where]
    blocks = len(plan.input_ids) // 16 + 2
    whole = paged_prefill(model, model.new_kv_pool(block_size=16, blocks=blocks), plan, media)
    pool = model.new_kv_pool(block_size=16, blocks=blocks)
    inputs = model.prompt_inputs(plan, media)
    model.forward_paged(pool, [contiguous(0, cached)], [inputs.embeds[:cached]],
                        [inputs.positions[:, :cached]])
    rest = paged_prefill(model, pool, plan, media, cached=cached)
    torch.testing.assert_close(rest, whole, rtol=1e-4, atol=1e-4)


def test_generated_tokens_continue_the_rope_after_the_images(model, checkpoint):
    """The engine's greedy tokens for an image prompt are the checkpoint's own generate()'s:
    decode positions are index + the prompt's offset (images take fewer positions)."""
    messages = two_image_messages()
    media = model.decode_media(messages, max_pixels=MAX_PIXELS)
    plan = model.plan(messages, media, enable_thinking=False)
    assert model.prompt_inputs(plan, media).position_offset < 0
    reference = Glm4vForConditionalGeneration.from_pretrained(checkpoint).eval()
    ids = torch.tensor([plan.input_ids])
    with torch.inference_mode():
        expected = reference.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids),
            pixel_values=torch.cat(media.pixel_values), image_grid_thw=torch.tensor(media.grids),
            mm_token_type_ids=(ids == model.image_token_id).int(), do_sample=False,
            max_new_tokens=12, min_new_tokens=12)[0, ids.shape[1]:].tolist()
    request = GenerationRequest("image", messages, SamplingParams(
        max_new_tokens=12, min_new_tokens=12, temperature=0.0, repetition_penalty=1.0,
        logprobs=0))
    engine = Engine(model, EngineConfig())
    engine.start()

    async def tokens() -> list[int]:
        handle = await engine.submit(request)
        return [t.token_id async for event in handle.events() if isinstance(event, Delta)
                for t in event.logprobs]

    try:
        assert asyncio.run(tokens()) == expected
    finally:
        engine.stop()


def test_concurrent_image_requests_decode_in_one_batch_as_they_would_alone(model, monkeypatch):
    """Four image requests at once share decode steps (GLM-4.1V runs in the batch), and
    each generates what it generates alone (greedy)."""
    batch_sizes: list[int] = []
    decode = model.decode_paged

    def recorded(pool, tables, lengths, tokens, offsets=None):
        batch_sizes.append(len(tokens))
        return decode(pool, tables, lengths, tokens, offsets)

    requests = [GenerationRequest(f"r{i}", [ChatMessage("user", [
        ImagePart(png_bytes(color=(60 * i, 0, 0)), "image/png", "messages[0].parts[0].image"),
        TextPart(f"request {i}")])], SamplingParams(max_new_tokens=16, min_new_tokens=16,
                                                    temperature=0.0)) for i in range(4)]
    alone = []
    for request in requests:
        engine = started(model, prefix_caching=False)
        try:
            alone += run(engine, [request])
        finally:
            engine.stop()
    monkeypatch.setattr(model, "decode_paged", recorded)
    engine = started(model, prefix_caching=False)
    try:
        batched = run(engine, requests)
    finally:
        engine.stop()
    assert max(batch_sizes) == 4
    assert all(final.usage.completion_tokens == 16 for _, final in batched)
    assert [text for text, _ in batched] == [text for text, _ in alone]
    assert len({text for text, _ in alone}) > 1  # the images make the outputs differ


def test_disk_offload_releases_the_tower_and_reload_restores_it(checkpoint):
    model = Glm4vModel(checkpoint)
    vision = model.encoders["image"]
    with vision.use() as tower:
        before = {k: v.clone() for k, v in tower.state_dict().items()}
        probe = weakref.ref(next(tower.parameters()))
        resident = sum(bytes_by_device(tower).values())
    with model.decoder_unit.use() as decoder:
        assert not any("visual" in name for name, _ in decoder.named_parameters())
    del tower
    freed = vision.move_to(DISK)
    gc.collect()
    assert freed == resident > 0
    assert vision.state().tier == DISK
    assert vision.state().weight_bytes == 0
    assert probe() is None, "something still holds the offloaded tower's parameters"
    with vision.use() as tower:
        after = tower.state_dict()
        assert after.keys() == before.keys()
        for key, value in before.items():
            assert torch.equal(after[key], value), key
    assert vision.state().tier == "cpu"


# ---- through a real server -------------------------------------------------------------


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("glm4v-server"), checkpoint) as server:
        yield server


def image_request(image: bytes, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, parts=[
            pb.Part(image=pb.Image(data=image, mime_type="image/png")),
            pb.Part(text="What is on the screen?"),
        ])],
        sampling=pb.SamplingParams(**{"max_new_tokens": 10, "temperature": 0, "seed": 7,
                                      **sampling}),
    )


def generate(stub, request) -> tuple[str, pb.FinalMessage]:
    responses = list(stub.Generate(request))
    return "".join(r.text_delta for r in responses), responses[-1].final


def vision_residency(modules) -> cpb.ModuleResidency:
    return next(m for m in modules if m.name == "vision")


def test_server_answers_an_image_request_counting_image_tokens(stub, checkpoint):
    request = image_request(png_bytes(), max_new_tokens=6)
    _, final = generate(stub, request)
    assert final.usage.completion_tokens == 6
    assert final.usage.image_tokens == expected_image_tokens(checkpoint, png_bytes())
    counted = stub.CountTokens(pb.CountTokensRequest(messages=request.messages))
    assert counted.prompt_tokens == final.usage.prompt_tokens
    assert counted.image_tokens == final.usage.image_tokens
    assert [(i.original_width, i.original_height) for i in final.images] == [(96, 64)]


def test_image_content_changes_the_output(stub):
    red, _ = generate(stub, image_request(png_bytes(color=(255, 0, 0))))
    blue, _ = generate(stub, image_request(png_bytes(color=(0, 0, 255))))
    assert red != blue


def test_repeated_image_prompt_reuses_its_cached_prefix(stub):
    request = image_request(png_bytes(color=(10, 200, 10)))
    first, _ = generate(stub, request)
    again, final = generate(stub, request)
    assert final.usage.cached_prompt_tokens > final.usage.image_tokens
    assert again == first


def test_model_info_lists_decoder_and_vision(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    modules = {m.name: m for m in info.modules}
    assert set(modules) == {"decoder", "vision"}
    assert modules["decoder"].architecture == "Glm4vForConditionalGeneration"
    assert modules["vision"].architecture == "Glm4vVisionModel"
    assert all(m.parameters > 0 and m.weight_bytes > 0 for m in info.modules)
    assert not any(m.trained for m in info.modules)
    assert list(info.modalities) == ["text", "image"]
    assert info.context_length == 4096


def test_vision_offload_to_disk_then_image_request_reloads_it(stub, control):
    request = image_request(png_bytes(color=(120, 60, 200)))
    before, _ = generate(stub, request)

    offloaded = control.OffloadModules(cpb.OffloadModulesRequest(modalities=["image"],
                                                                 tier=cpb.TIER_DISK))
    assert offloaded.result.freed_bytes > 0
    assert vision_residency(offloaded.modules).tier == cpb.TIER_DISK
    status = control.GetMemoryStatus(cpb.GetMemoryStatusRequest()).status
    assert vision_residency(status.modules).tier == cpb.TIER_DISK
    assert vision_residency(status.modules).weight_bytes == 0
    # No cached prefix may cover the image, so that the tower has to run again.
    control.TrimKvCache(cpb.TrimKvCacheRequest(policy=cpb.TRIM_POLICY_ALL_IDLE))

    after, final = generate(stub, request)
    assert final.usage.cached_prompt_tokens == 0
    assert after == before
    status = control.GetMemoryStatus(cpb.GetMemoryStatusRequest()).status
    assert vision_residency(status.modules).tier == cpb.TIER_CPU
    assert vision_residency(status.modules).weight_bytes > 0


def test_audio_part_is_invalid_argument_naming_the_part(stub):
    request = pb.GenerateRequest(messages=[pb.Message(role=pb.ROLE_USER, parts=[
        pb.Part(text="listen"), pb.Part(audio=pb.Audio(wav=wav_bytes(0.2))),
    ])])
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[0].parts[1].audio" in info.value.details()
    assert "audio" in info.value.details()


@pytest.mark.parametrize("chunk", [8, 4096], ids=["long-ones-swap", "all-recompute"])
def test_preempted_image_requests_finish_with_the_output_of_an_unpreempted_run(model, chunk):
    """Image prompts through a budget for about two: swapped out and in, or recomputed
    (the image encoded again and its rope positions rebuilt for what remains), each ends
    with the greedy output of a run with room for all."""
    requests = [GenerationRequest(f"p{i}", [ChatMessage("user", [
        ImagePart(png_bytes(color=(50 * i, 90, 20)), "image/png", "messages[0].parts[0].image"),
        TextPart(f"screen {i}")])], SamplingParams(max_new_tokens=48, min_new_tokens=48,
                                                   temperature=0.0, repetition_penalty=1.0))
                for i in range(5)]
    runs = preemption_runs(model, chunk, requests=requests)
    assert all(text for text, _ in runs.expected)
    assert [text for text, _ in runs.got] == [text for text, _ in runs.expected]
    assert runs.tight.preemptions > 0
    assert (runs.tight.swaps > 0) if chunk == 8 else (runs.tight.swaps == 0)


def test_live_audio_is_invalid_argument_naming_the_audio_before_any_is_sent(stub):
    start = pb.GenerateLiveRequest(start=pb.GenerateLiveStart(
        request=pb.GenerateRequest(messages=[pb.Message(
            role=pb.ROLE_USER, parts=[pb.Part(text="listen")])]),
        format=pb.LiveAudioFormat(sample_rate_hz=16_000, encoding=pb.PCM_ENCODING_S16LE)))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GenerateLive(iter([start])))  # refused at start: no audio, no end needed
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("audio")


def test_layers_split_over_a_device_list_decode_as_on_one_device(model, checkpoint):
    """`--device cpu,cpu`: the decoder's layers placed by an explicit device map, a
    pipeline (on a GPU host: cuda:0,cuda:1 or cuda:0,cpu, tests/inference_svc/test_gpu.py);
    greedy replies to image requests equal the whole model's, and the KV pool holds each
    layer on its layer's device."""
    split = Glm4vModel(checkpoint, layer_devices=("cpu", "cpu"))
    layers = split.checkpoint_config.config.text_config.num_hidden_layers
    assert split._device_map()["model.language_model.layers.0"] == "cpu"
    assert split.new_kv_pool(block_size=16, blocks=1).layer_devices == ["cpu"] * layers
    assert image_replies(split) == image_replies(model)


def image_replies(model) -> list[str]:
    """Greedy replies of `model` through the engine to two requests with an image each."""
    requests = [GenerationRequest(f"r{i}", [ChatMessage("user", [
        ImagePart(png_bytes(color=(80 * i, 30, 0)), "image/png", "messages[0].parts[0].image"),
        TextPart(f"request {i}")])], SamplingParams(max_new_tokens=12, min_new_tokens=12,
                                                    temperature=0.0)) for i in range(2)]
    engine = started(model, prefix_caching=False)
    try:
        return [text for text, _ in run(engine, requests)]
    finally:
        engine.stop()


def test_a_device_list_is_split_evenly_in_order():
    from inference_svc.model.checkpoints.placement import (
        UnplaceableDevice,
        plan_placement,
        split_layers,
    )

    assert split_layers(5, ["cuda:0", "cpu"]) == ["cuda:0"] * 3 + ["cpu"] * 2
    assert split_layers(40, ["cuda:0", "cuda:1"]) == ["cuda:0"] * 20 + ["cuda:1"] * 20
    placement = plan_placement("cpu, cpu")
    assert placement.layer_devices == ("cpu", "cpu") and placement.encoder_device == "cpu"
    with pytest.raises(UnplaceableDevice, match="cpu and cuda:N"):
        plan_placement("cpu,mps")


def test_the_memory_account_puts_each_layers_kv_on_its_device():
    from inference_svc.memory.account import kv_by_device

    # a 40-layer decoder over two cards holds half its KV on each
    assert kv_by_device(4_000, ["cuda:0"] * 20 + ["cuda:1"] * 20) == {
        "cuda:0": 2_000, "cuda:1": 2_000}
    assert kv_by_device(3_000, ["cuda:0", "cuda:0", "cpu"]) == {"cuda:0": 2_000, "cpu": 1_000}
    assert kv_by_device(512, ["cpu"] * 3) == {"cpu": 512}
