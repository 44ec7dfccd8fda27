"""Every request field of OpenAI's completions and chat completions (and the vLLM extensions we serve):
supported, or refused with a 400 naming it. tests/engine/test_openai_fields.py walks the official `openai`
package's request types, so a field OpenAI adds fails a test until it has a line here; docs/engine.md's
table is this one.

SUPPORTED fields are served as documented; REFUSED ones get a 400 whose `param` names them unless their
value asks for nothing (e.g. `store: false`). Fields in neither are logged as ignored (as vLLM does).
"""

from __future__ import annotations

SUPPORTED, REFUSED = "supported", "refused"

_SHARED = {
    "model": (SUPPORTED, "any --served-model-name (404 otherwise); the answer carries the name the request used"),
    "max_tokens": (SUPPORTED, "omitted: the rest of the context (max_model_len - prompt), or generation_config's "
                              "max_new_tokens"),
    "temperature": (SUPPORTED, "[0, 2]; 0 is greedy; generation_config default when omitted"),
    "top_p": (SUPPORTED, "(0, 1]; generation_config default when omitted"),
    "n": (SUPPORTED, "1..64 choices per prompt (prompts x n <= 256), each its own seeded stream (choice_seed); "
                     "streamed interleaved by index"),
    "seed": (SUPPORTED, "the same tokens whatever the batch, and across a migration; choice j uses "
                        "choice_seed(seed, j)"),
    "stop": (SUPPORTED, "up to 16 strings, cut from the text"),
    "stream": (SUPPORTED, "server-sent events"),
    "stream_options": (SUPPORTED, "include_usage"),
    "presence_penalty": (SUPPORTED, "[-2, 2], over the output tokens"),
    "frequency_penalty": (SUPPORTED, "[-2, 2], over the output tokens"),
    "logit_bias": (SUPPORTED, "token id (string) -> [-100, 100], added to the logits"),
    "user": (SUPPORTED, "accepted as an identifier; not used for sampling"),
}
_VLLM = {
    "top_k": (SUPPORTED, "vLLM: -1 or 0 = no limit"),
    "min_p": (SUPPORTED, "vLLM: [0, 1]"),
    "repetition_penalty": (SUPPORTED, "vLLM: (0, 2], over prompt + output tokens"),
    "min_tokens": (SUPPORTED, "vLLM: EOS and stop_token_ids masked until this many output tokens"),
    "stop_token_ids": (SUPPORTED, "vLLM"),
    "ignore_eos": (SUPPORTED, "vLLM"),
    "allowed_token_ids": (SUPPORTED, "vLLM: sample only among these"),
    "response_format": (SUPPORTED, "text / json_object / json_schema (always strict) through the grammar engine"),
    "guided_json": (SUPPORTED, "vLLM: a JSON schema (object or text)"),
    "guided_regex": (SUPPORTED, "vLLM"),
    "guided_choice": (SUPPORTED, "vLLM"),
    "guided_grammar": (SUPPORTED, "vLLM: EBNF / lark grammar"),
    "structured_outputs": (SUPPORTED, "vLLM: one of json, regex, choice, grammar, json_object"),
}

COMPLETIONS = {
    **_SHARED, **_VLLM,
    "prompt": (SUPPORTED, "a string, token ids, or a list of either; choice index = prompt index * n + j"),
    "echo": (SUPPORTED, "the prompt (and its logprobs) before the completion; with max_tokens 0 it scores "
                        "the prompt (lm-eval-harness log-likelihoods)"),
    "logprobs": (SUPPORTED, "[0, 20]: tokens, token_logprobs, top_logprobs, text_offset"),
    "best_of": (SUPPORTED, "equal to n only; above n is refused (400, param best_of)"),
    "prompt_logprobs": (SUPPORTED, "vLLM: [0, 20] per prompt token ({id: {logprob, rank, decoded_token}}), on the "
                                   "choice; streamed: in its first chunk (vLLM refuses k > 0 with stream)"),
    "suffix": (REFUSED, "no model we serve fills in the middle"),
}

CHAT = {
    **_SHARED, **_VLLM,
    "messages": (SUPPORTED, "text parts; assistant tool_calls and tool messages go to the chat template"),
    "max_completion_tokens": (SUPPORTED, "as max_tokens (wins over it)"),
    "logprobs": (SUPPORTED, "logprobs.content: token, logprob, bytes, top_logprobs"),
    "top_logprobs": (SUPPORTED, "[0, 20], with logprobs: true"),
    "tools": (SUPPORTED, "passed to the chat template"),
    "tool_choice": (SUPPORTED, "auto (parsed with --tool-call-parser; needs --enable-auto-tool-choice), none, "
                               "required and named (constrained to the call's JSON by the grammar engine)"),
    "parallel_tool_calls": (SUPPORTED, "false: at most one call"),
    "chat_template_kwargs": (SUPPORTED, "vLLM: passed to the template (e.g. enable_thinking)"),
    "add_generation_prompt": (SUPPORTED, "vLLM"),
    "continue_final_message": (SUPPORTED, "vLLM: the prompt ends inside the last message (its text, no end of "
                                          "turn) and the answer continues it; needs add_generation_prompt false"),
    "prompt_logprobs": (SUPPORTED, "vLLM: [0, 20] per prompt token ({id: {logprob, rank, decoded_token}}), on the "
                                   "answer; streamed: on the first chunk (vLLM refuses k > 0 with stream)"),
    "prompt_cache_key": (SUPPORTED, "a caching hint: prefix caching is automatic"),
    "safety_identifier": (SUPPORTED, "accepted as an identifier, like user"),
    "prompt_cache_retention": (SUPPORTED, "in_memory only (the prefix cache); 24h refused"),
    "prompt_cache_options": (REFUSED, "no explicit breakpoints or lifetimes: prefix caching is automatic"),
    "moderation": (REFUSED, "no moderation"),
    "service_tier": (SUPPORTED, "auto / default (one tier); others refused"),
    "store": (SUPPORTED, "false only: completions are not stored"),
    "metadata": (SUPPORTED, "empty only (it goes with store)"),
    "modalities": (SUPPORTED, '["text"] only'),
    "audio": (REFUSED, "no audio output"),
    "functions": (REFUSED, "deprecated by OpenAI: use tools"),
    "function_call": (REFUSED, "deprecated by OpenAI: use tool_choice"),
    "prediction": (REFUSED, "no predicted outputs"),
    "web_search_options": (REFUSED, "no web search"),
    "reasoning_effort": (REFUSED, "use chat_template_kwargs (enable_thinking) for reasoning models"),
    "verbosity": (REFUSED, "no verbosity control"),
}

# A value of each refused field that asks for something (tests send it and expect a 400 naming the field).
REFUSED_EXAMPLES = {
    "suffix": "!", "audio": {"voice": "alloy", "format": "wav"}, "functions": [{"name": "f"}],
    "function_call": "auto", "prediction": {"type": "content", "content": "x"},
    "web_search_options": {}, "reasoning_effort": "low", "verbosity": "low", "store": True,
    "metadata": {"k": "v"}, "service_tier": "flex",
    "prompt_cache_retention": "24h", "prompt_cache_options": {"mode": "explicit"}, "moderation": {}, "modalities": ["text", "audio"], "best_of": 3,
}


def markdown(table: dict[str, tuple[str, str]]) -> str:
    """The table as docs/engine.md carries it."""
    rows = ["| field | | how |", "|---|---|---|"]
    rows += [f"| `{name}` | {status} | {how} |" for name, (status, how) in sorted(table.items())]
    return "\n".join(rows)
