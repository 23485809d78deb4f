"""Response formats in the batched sampler: constrained and free rows share a batch."""

from __future__ import annotations

import json

import pytest
import torch

from inference_svc.engine.constraints import allowed_tokens, mask_words
from inference_svc.errors import InvalidRequest
from inference_svc.types import Delta, Finished, ResponseFormat
from tests.unit.engine_runs import request, run_all

BOOL_SCHEMA = json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}},
                          "required": ["ok"], "additionalProperties": False})


def test_mask_words_unpack_to_the_allowed_columns():
    words = mask_words(2, 70)
    words[0, 0] = 0b101  # tokens 0 and 2
    words[1, 2] = 1 << 5  # token 69
    allowed = allowed_tokens(words, 72, torch.device("cpu"))
    assert allowed.shape == (2, 72)
    assert allowed[0].nonzero().flatten().tolist() == [0, 2]
    assert allowed[1].nonzero().flatten().tolist() == [69]


def test_constrained_and_free_rows_share_a_batch(model):
    formats = {"schema": ResponseFormat("json_schema", schema=BOOL_SCHEMA),
               "regex": ResponseFormat("regex", pattern="(yes|no)!"),
               "object": ResponseFormat("json_object")}
    requests = [request(name, tokens=40, min_new_tokens=0, temperature=1.0,
                        response_format=fmt) for name, fmt in formats.items()]
    requests += [request("free", tokens=8), request("free-logprobs", tokens=8, logprobs=2)]
    outcomes, engine = run_all(model, requests)
    assert all(isinstance(o, Finished) for o in outcomes), outcomes
    assert engine.completed == len(requests)


def texts_of(model, requests):
    import asyncio

    from inference_svc.engine.engine import Engine, EngineConfig

    engine = Engine(model, EngineConfig())
    engine.start()

    async def one(req):
        handle = await engine.submit(req)
        events = [e async for e in handle.events()]
        return ("".join(e.text for e in events if isinstance(e, Delta)), events[-1],
                [lp for e in events if isinstance(e, Delta) for lp in e.logprobs])

    async def main():
        return await asyncio.gather(*(one(r) for r in requests))

    try:
        return asyncio.run(main())
    finally:
        engine.stop()


def test_formats_hold_and_end_only_when_complete(model):
    requests = [
        request("schema", tokens=40, min_new_tokens=0, temperature=1.0,
                response_format=ResponseFormat("json_schema", schema=BOOL_SCHEMA)),
        request("regex", tokens=40, min_new_tokens=0, temperature=1.0,
                response_format=ResponseFormat("regex", pattern="(yes|no)!")),
        request("free", tokens=6, logprobs=3),
    ]
    (schema, done, _), (regex, regex_done, _), (_, _, logprobs) = texts_of(model, requests)
    assert json.loads(schema) in ({"ok": True}, {"ok": False})
    assert done.reason.value == "stop"
    assert regex in ("yes!", "no!") and regex_done.reason.value == "stop"
    assert len(logprobs) == 6
    for entry in logprobs:
        assert len(entry.top) == 3
        same = [alt for alt in entry.top if alt.token_id == entry.token_id]
        assert not same or same[0].logprob == entry.logprob


@pytest.mark.parametrize(("fmt", "field"), [
    (ResponseFormat("json_schema", schema='{"type": "bogus"}'),
     "sampling.response_format.json_schema.schema"),
    (ResponseFormat("json_schema", schema="{not json"),
     "sampling.response_format.json_schema.schema"),
    (ResponseFormat("regex", pattern="(unclosed"), "sampling.response_format.regex"),
])
def test_an_unusable_format_is_invalid_naming_the_field(model, fmt, field):
    (outcome,), _ = run_all(model, [request("bad", response_format=fmt)])
    assert isinstance(outcome, InvalidRequest) and outcome.field == field


def test_a_schema_is_compiled_once(model):
    from inference_svc.engine.engine import Engine, EngineConfig

    engine = Engine(model, EngineConfig())
    fmt = ResponseFormat("json_schema", schema=BOOL_SCHEMA)
    assert engine.grammars.compile(fmt) is engine.grammars.compile(fmt)
