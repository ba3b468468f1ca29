"""The SGLang /generate protocol on recorded-format fixtures (written from
shared/reference/sglang-protocol.md)."""

import base64
import copy

import numpy as np
import pytest

from dppo_megatron.rollout.protocol import (
    ProtocolError, RequestAborted, RoutingShape, SamplingParams, decode_routed_experts, encode_routed_experts,
    error_message, generate_request, parse_generate_response,
)

PROMPT = [151644, 872, 198]
ROUTING = RoutingShape(num_layers=2, experts_per_token=2, num_experts=8)
ROUTES = np.array([[[0, 3], [1, 7]], [[2, 5], [4, 6]], [[7, 0], [3, 3]], [[1, 2], [5, 6]]], dtype=np.int32)

RESPONSE = {  # the shape of a real SGLang response with logprobs, top-2 and routed experts
    "output_ids": [785, 151645],
    "meta_info": {
        "id": "s0", "finish_reason": {"type": "stop", "matched": 151645},
        "prompt_tokens": 3, "completion_tokens": 2, "cached_tokens": 0, "weight_version": "7",
        "output_token_logprobs": [[-0.25, 785, None], [-0.01, 151645, None]],
        "output_top_logprobs": [
            [[-0.25, 785, None], [-1.75, 42, None]],
            [[-3.5, 11, None], [-4.0, 12, None]],  # the sampled 151645 is not among them
        ],
        "routed_experts": encode_routed_experts(ROUTES),  # prompt 3 + response 2 - 1 = 4 rows
    },
}


def parse(body, **kwargs):
    args = dict(rid="s0", prompt_ids=PROMPT, server="http://127.0.0.1:30000", topk=2, routing=ROUTING)
    args.update(kwargs)
    return parse_generate_response(body, **args)


def test_request_asks_for_token_ids_logprobs_topk_and_routes():
    body = generate_request("s0", PROMPT, SamplingParams(max_new_tokens=64, stop_token_ids=(151645,)),
                            topk=20, return_routed_experts=True)
    assert body["input_ids"] == PROMPT and body["rid"] == "s0"
    assert body["return_logprob"] is True and body["top_logprobs_num"] == 20 and body["return_routed_experts"]
    params = body["sampling_params"]
    assert params["max_new_tokens"] == 64 and params["stop_token_ids"] == [151645] and params["top_k"] == -1
    assert params["skip_special_tokens"] is False and params["no_stop_trim"] is True


def test_request_leaves_out_what_is_not_needed():
    body = generate_request("s1", PROMPT, SamplingParams())
    assert "top_logprobs_num" not in body and "return_routed_experts" not in body
    assert "sampling_seed" not in body["sampling_params"]


def test_a_full_response_decodes_into_a_sample():
    sample = parse(RESPONSE)
    assert sample.response_ids == [785, 151645] and sample.logprobs == [-0.25, -0.01]
    assert sample.finish_reason == "stop" and not sample.truncated and sample.weight_version == "7"
    assert sample.server == "http://127.0.0.1:30000" and sample.num_retractions == 0
    np.testing.assert_array_equal(sample.routed_experts, ROUTES)


def test_sampled_token_replaces_the_last_topk_entry_when_missing():
    sample = parse(RESPONSE)
    assert sample.topk_ids[0] == [785, 42] and sample.topk_logprobs[0] == [-0.25, -1.75]  # already in
    assert sample.topk_ids[1] == [11, 151645] and sample.topk_logprobs[1] == [-3.5, -0.01]  # forced in


def test_length_finish_marks_the_sample_truncated():
    body = copy.deepcopy(RESPONSE)
    body["meta_info"]["finish_reason"] = {"type": "length", "length": 2}
    assert parse(body).truncated


def test_abort_is_reported_for_resending():
    body = copy.deepcopy(RESPONSE)
    body["meta_info"]["finish_reason"] = {"type": "abort", "message": "memory", "status_code": 503}
    with pytest.raises(RequestAborted, match="aborted by the server: memory"):
        parse(body)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b["meta_info"].pop("routed_experts"), "no routed_experts"),
        (lambda b: b["meta_info"].update(routed_experts="not base64!"), "not valid base64"),
        (lambda b: b["meta_info"].update(routed_experts=encode_routed_experts(ROUTES[:3])), "3 rows, expected"),
        (lambda b: b["meta_info"].update(routed_experts=encode_routed_experts(ROUTES[:3, :1])), "whole number"),
        (lambda b: b["meta_info"].update(routed_experts=encode_routed_experts(ROUTES + 5)), "outside \\[0, 8\\)"),
        (lambda b: b["meta_info"].pop("output_token_logprobs"), "return_logprob dropped"),
        (lambda b: b["meta_info"]["output_token_logprobs"][1].__setitem__(1, 9), "is for token 9"),
        (lambda b: b["meta_info"].pop("output_top_logprobs"), "top_logprobs_num dropped"),
        (lambda b: b["meta_info"]["output_top_logprobs"][0].pop(), "has 1 entries, expected 2"),
        (lambda b: b["meta_info"].update(finish_reason={"type": "weird"}), "unknown finish_reason"),
        (lambda b: b.pop("meta_info"), "missing meta_info"),
        (lambda b: b.update(output_ids="785"), "output_ids must be a list"),
    ],
)
def test_malformed_responses_are_refused_naming_server_and_request(mutate, message):
    body = copy.deepcopy(RESPONSE)
    mutate(body)
    with pytest.raises(ProtocolError, match=message) as caught:
        parse(body)
    assert "server http://127.0.0.1:30000, request s0" in str(caught.value)


def test_routes_are_not_required_when_r3_is_off():
    body = copy.deepcopy(RESPONSE)
    del body["meta_info"]["routed_experts"]
    assert parse(body, routing=None).routed_experts is None


def test_routes_round_trip_through_sglangs_encoding():
    encoded = encode_routed_experts(ROUTES)
    raw = np.frombuffer(base64.b64decode(encoded), "<i4")  # as the reference decodes it
    np.testing.assert_array_equal(raw.reshape(-1, 2, 2), ROUTES)
    np.testing.assert_array_equal(decode_routed_experts(encoded, ROUTING, rows=4), ROUTES)


@pytest.mark.parametrize(
    "status, text, expected",
    [
        (400, '{"error": {"message": "bad sampling_params"}}', "HTTP 400: bad sampling_params"),
        (503, '{"detail": "not ready"}', "HTTP 503: not ready"),
        (500, "Internal Server Error", "HTTP 500: Internal Server Error"),
    ],
)
def test_error_bodies_become_readable_messages(status, text, expected):
    assert error_message(status, text) == expected
