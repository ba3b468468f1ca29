"""/generate bodies a client may send, good and bad, for a model of 300 tokens and 128
positions (tests/tiny_models.py): the embedded engine's answer to each is checked in
test_embedded_engine.py, and that it refuses exactly what SGLang's own code refuses in
test_sglang_contract.py."""

VOCAB, CONTEXT = 300, 128


def body(**fields) -> dict:
    sampling = fields.pop("sampling", None)
    return {"input_ids": [5, 17, 42], "sampling_params": {"max_new_tokens": 2, **(sampling or {})}, **fields}


# name -> (body, what the engine's 400 says; None: served). Bodies SGLang would serve but the
# engine does not are in UNSERVED.
BODIES = {
    "plain": (body(), None),
    "batch": (body(input_ids=[[5, 6], [7, 8, 9]], rid=["a", "b"]), None),
    "sampling_params null": ({"input_ids": [5, 17], "sampling_params": None}, None),
    "top-K and flat base64": (body(return_logprob=True, top_logprobs_num=4, return_flat_raw_output_top_logprobs=True,
                                   return_flat_raw_top_logprobs_b64=True), None),
    "greedy": (body(sampling={"temperature": 0}), None),
    "max seed": (body(sampling={"sampling_seed": 2**63 - 1}), None),
    "negative seed": (body(sampling={"sampling_seed": -(2**63)}), None),
    "prompt + new tokens fill the context": (body(input_ids=[5] * 100, sampling={"max_new_tokens": 28}), None),
    "top_k -1": (body(sampling={"top_k": -1}), None),
    "null sampling fields": (body(sampling={"temperature": None, "top_p": None, "stop_token_ids": None}), None),
    "no input_ids": ({"sampling_params": {}}, "input_ids is required"),
    "input_ids booleans": (body(input_ids=[True, False]), r"input_ids\[0\] must be a token id"),
    "input_ids mixed nesting": (body(input_ids=[[3, 8], 5]), r"input_ids\[1\] must be a non-empty list"),
    "input_ids empty": (body(input_ids=[]), "input_ids must be a non-empty list"),
    "input_ids float": (body(input_ids=[5, 1.5]), r"input_ids\[1\] must be a token id"),
    "sampling_params a number": (body(sampling_params=5), "sampling_params must be an object"),
    "unknown sampling field": (body(sampling={"bogus": 1}), "sampling_params: unknown field 'bogus'"),
    "temperature a string": (body(sampling={"temperature": "hot"}), "temperature must be a number"),
    "temperature negative": (body(sampling={"temperature": -1}), "temperature must be a non-negative finite"),
    "temperature overflowing": (body(sampling={"temperature": 1e999}), "not JSON|non-negative finite"),
    "min_p 5": (body(sampling={"min_p": 5}), r"min_p must be in \[0, 1\]"),
    "top_p 0": (body(sampling={"top_p": 0}), r"top_p must be in \(0, 1\]"),
    "top_k 0": (body(sampling={"top_k": 0}), "top_k must be -1"),
    "top_k -5": (body(sampling={"top_k": -5}), "top_k must be -1"),
    "top_k a float": (body(sampling={"top_k": 2.5}), "top_k must be an integer"),
    "max_new_tokens a string": (body(sampling={"max_new_tokens": "4"}), "max_new_tokens must be an integer"),
    "max_new_tokens a float": (body(sampling={"max_new_tokens": 2.5}), "max_new_tokens must be an integer"),
    "max_new_tokens negative": (body(sampling={"max_new_tokens": -1}), "max_new_tokens must be in"),
    "max_new_tokens past the context": (body(sampling={"max_new_tokens": 10**9}), "exceed the model's context length"),
    "max_new_tokens past int64": (body(sampling={"max_new_tokens": 10**30}), "max_new_tokens must be in"),
    "prompt past the context": (body(input_ids=[5] * 128), "longer than the model's context length"),
    "prompt + new tokens past the context": (body(input_ids=[5] * 100, sampling={"max_new_tokens": 29}),
                                             "exceed the model's context length"),
    "sampling_seed a string": (body(sampling={"sampling_seed": "abc"}), "sampling_seed must be an integer"),
    "sampling_seed past int64": (body(sampling={"sampling_seed": 2**70}), "sampling_seed must be in"),
    "top_logprobs_num a string": (body(top_logprobs_num="4"), "top_logprobs_num must be an integer"),
    "stop_token_ids a string": (body(sampling={"stop_token_ids": "x"}), "stop_token_ids must be a list"),
    "stop_token_ids of strings": (body(sampling={"stop_token_ids": ["x"]}), r"stop_token_ids\[0\] must be an integer"),
    "return_logprob a string": (body(return_logprob="yes"), "return_logprob must be true or false"),
    "rid a number": (body(rid=5), "rid must be a string"),
    "rids for another batch": (body(input_ids=[[5], [6]], rid=["a"]), "rid: 1 values for 2 prompts"),
    "sampling_params for another batch": (body(input_ids=[[5], [6]], sampling_params=[{}]),
                                          "sampling_params: 1 values for 2 prompts"),
    # Our SGLang servers run with --skip-tokenizer-init: no tokenizer to match strings with.
    "stop strings": (body(sampling={"stop": ["\n"]}), "stop strings"),
    "b64 without flat": (body(top_logprobs_num=2, return_flat_raw_top_logprobs_b64=True),
                         "requires return_flat_raw_top_logprobs"),
}

# Served by SGLang, refused by name by the embedded engine.
UNSERVED = {
    "text prompt": ({"text": "hello", "sampling_params": {"max_new_tokens": 2}}, "text prompts"),
    "stream": (body(stream=True), "streaming is not served"),
    "n = 2": (body(sampling={"n": 2}), "only 1 is served"),
    "repetition penalty": (body(sampling={"repetition_penalty": 1.2}), "only 1.0 is served"),
    "input logprobs": (body(return_logprob=True, logprob_start_len=0), "input logprobs are not served"),
    "max_new_tokens 0": (body(sampling={"max_new_tokens": 0}), "prefill only"),
}

# Refused by the engine, not checked by SGLang 0.5.23's request path: a prompt id past the
# vocabulary goes on to the model's embedding lookup (a device-side assert on a GPU).
STRICTER = {
    "input_ids out of the vocabulary": (body(input_ids=[5, 300]), r"input_ids\[1\] must be a token id in \[0, 300\)"),
}
