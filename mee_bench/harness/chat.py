"""Chat templates for `--apply_chat_template`, `--system_instruction` and `--fewshot_as_multiturn`.

lm-eval builds the chat history of every request (system instruction, few-shot turns, the
question) and asks the model to render it; this renders it exactly as lm-eval's `hf` model does,
with the checkpoint's own tokenizer template, so an instruct checkpoint sees the same prompt
under `--model mee` as under `--model hf`, and early exit changes only how it is decoded.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def apply_chat_template(
    tokenizer: Any, source: str, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
) -> str:
    """The history rendered by `tokenizer`'s chat template, as lm-eval's `hf` model renders it: a template
    that refuses a system turn (some do) gets the history without it, with a warning; `source` (the
    checkpoint) names a tokenizer without a template in the error."""
    import jinja2

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of {source} has no chat template, so --apply_chat_template cannot render the prompts; "
            "drop --apply_chat_template, or use an instruct checkpoint whose tokenizer_config.json has a chat_template"
        )
    kwargs = dict(
        tokenize=False, add_generation_prompt=add_generation_prompt, continue_final_message=not add_generation_prompt
    )
    try:
        return tokenizer.apply_chat_template(chat_history, **kwargs)
    except jinja2.exceptions.TemplateError:
        log.warning("the chat template of %s failed on this history; rendering it without the system turn", source)
        return tokenizer.apply_chat_template([turn for turn in chat_history if turn["role"] != "system"], **kwargs)
