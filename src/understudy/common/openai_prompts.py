"""OpenAI prompts: a chat request rendered through the model's chat template (text and token ids, also for
/tokenize), and the token ids of a completions request's prompts."""

from __future__ import annotations

from understudy.common.api import ChatCompletionRequest, CompletionRequest
from understudy.common.openai_requests import FieldError
from understudy.common.tokenizer import Tokenizer

MAX_CHOICES = 256  # prompts x n in one request


def chat_text(tokenizer: Tokenizer, body: ChatCompletionRequest) -> str:
    """A chat request through the model's chat template: the history with its tool calls and tool results,
    the tools, chat_template_kwargs (e.g. enable_thinking), add_generation_prompt / continue_final_message.
    The chat routes and /tokenize render with it. FieldError if it fails."""
    try:
        messages = [m.for_template() for m in body.messages]
    except ValueError as e:
        raise FieldError("messages", str(e)) from None
    if body.add_generation_prompt and body.continue_final_message:
        raise FieldError("continue_final_message", "add_generation_prompt and continue_final_message cannot "
                                                   "both be true")
    kwargs = dict(body.chat_template_kwargs or {})
    if body.tools and body.tool_choice != "none":
        kwargs["tools"] = body.tools
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt, **kwargs)
    except Exception as e:  # noqa: BLE001 - a template error is the request's fault
        raise FieldError("messages", f"cannot render the chat template: {e}") from e
    if body.continue_final_message:  # end at the last message's text, not after its end-of-turn tokens
        last = messages[-1]["content"]
        cut = text.rfind(last)
        text = text[: cut + len(last)] if last and cut >= 0 else text
    return text


def chat_prompt(tokenizer: Tokenizer, body: ChatCompletionRequest) -> list[int]:
    """The token ids of chat_text (the template has the special tokens it wants: none are added)."""
    return tokenizer.encode(chat_text(tokenizer, body), add_special_tokens=False)


def completion_prompts(tokenizer: Tokenizer, body: CompletionRequest) -> list[list[int]]:
    prompts = []
    if len(CompletionRequest.prompt_list(body.prompt)) * body.n > MAX_CHOICES:
        raise FieldError("n", f"at most {MAX_CHOICES} choices per request (prompts x n)")
    for p in CompletionRequest.prompt_list(body.prompt):
        ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:  # "" encodes to no token
            raise FieldError("prompt", "the prompt is empty")
        prompts.append(ids)
    return prompts
