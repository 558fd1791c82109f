"""The layouts of a preference record, and their text, as TRL 1.16 prepares them before tokenising.

Accepted layouts (``chosen`` and ``rejected`` are always both strings or both message lists):

- **explicit prompt**: ``{"prompt", "chosen", "rejected"}``, all three strings or all three lists of
  ``{"role", "content"}`` messages (the prompt's turns, then each answer's turn(s));
- **implicit prompt** (TRL's): ``{"chosen", "rejected"}`` only, each the whole conversation or text; the prompt is
  their common start;
- **UltraFeedback's**: a string ``prompt`` next to message-list answers that repeat the user turn
  (``chosen = [{"role": "user", ...}, {"role": "assistant", ...}]``); as in TRL, the string prompt is ignored and the
  prompt is the answers' common start, as for an implicit prompt.

:func:`explicit_prompt` is TRL's ``maybe_extract_prompt``; :func:`render_conversation` is TRL's
``apply_chat_template`` for a preference record. Both refuse, with a message, the records on which TRL's would fail
or produce an empty prompt. A key whose value is null counts as missing (Parquet files and ``datasets`` give
None where a row lacks a column). Other keys of a record are ignored, except ``chat_template_kwargs`` (a dict passed to
the chat template, as TRL does).
"""
from itertools import takewhile
from typing import Any, Dict, List, Tuple, Union

Text = Union[str, List[Dict[str, Any]]]
#: the keys a record needs whatever its layout; ``prompt`` is needed unless the answers hold it
ANSWER_KEYS = ("chosen", "rejected")
#: what the accepted layouts are, for error messages
LAYOUTS = ("{\"prompt\", \"chosen\", \"rejected\"}, or {\"chosen\", \"rejected\"} that start with the same prompt "
           "(TRL's implicit prompt)")


def is_conversation(value: Any) -> bool:
    """A non-empty list of ``{"role": str, "content": str}`` messages."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def _kind(record: Dict[str, Any], key: str) -> str:
    value = record[key]
    if isinstance(value, str):
        return "text"
    if is_conversation(value):
        return "conversation"
    shown = repr(value) if not isinstance(value, (list, dict)) else str(value)
    raise ValueError(f"'{key}' must be a string or a non-empty list of {{\"role\", \"content\"}} messages, "
                     f"got {shown[:80]}")


def extract_prompt(chosen: Text, rejected: Text) -> Tuple[Text, Text, Text]:
    """``(prompt, chosen, rejected)``: the answers' common start split off, as TRL's ``extract_prompt``.

    The common start ends before the first differing character (text) or message (conversation); for text, a space
    right before that point goes to the answers. When one answer is the start of the other, the prompt stops one
    element short of the shorter one (TRL's loop). Conversations that differ from their first message have no
    prompt, and are refused (TRL fails on them).
    """
    if not chosen or not rejected:
        raise ValueError("'chosen' and 'rejected' must not be empty")
    for index in range(min(len(chosen), len(rejected))):
        if chosen[index] != rejected[index]:
            # TRL looks at chosen[index - 1] for index 0 too, i.e. at the last character: only index > 0 is meant
            if index > 0 and chosen[index - 1] == " ":
                index -= 1
            break
    if isinstance(chosen, list) and index == 0:
        raise ValueError("no shared prompt to extract: 'chosen' and 'rejected' must start with the same message(s) "
                         "and go on with different ones (or give the record a 'prompt')")
    return chosen[:index], chosen[index:], rejected[index:]


def explicit_prompt(record: Any) -> Tuple[Text, Text, Text]:
    """``(prompt, chosen, rejected)`` of a record in any accepted layout (TRL's ``maybe_extract_prompt``).

    Raises ``ValueError`` saying what is wrong with the record.
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object: {LAYOUTS}; got {type(record).__name__}")
    # null counts as missing: columnar files (Parquet, datasets) give None where a row lacks a column
    missing = [key for key in ANSWER_KEYS if record.get(key) is None]
    if missing:
        raise ValueError(f"missing key(s) {missing}; a record needs {LAYOUTS}")
    answers = {_kind(record, key) for key in ANSWER_KEYS}
    if len(answers) > 1:
        raise ValueError("'chosen' and 'rejected' must both be strings or both be message lists, not a mix")
    (answers,) = answers
    if record.get("prompt") is not None:
        prompt_kind = _kind(record, "prompt")
        if prompt_kind == answers:
            prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
            _check_prompt_end(prompt)
            return prompt, chosen, rejected
        if prompt_kind == "conversation":
            # TRL would drop this prompt and take the strings' common start: a likely mistake, refused
            raise ValueError("a message-list 'prompt' needs message-list answers; prompt, chosen and rejected must "
                             "all be strings or all be message lists (or, UltraFeedback's layout, a string prompt "
                             "and message-list answers that repeat the user turn)")
    prompt, chosen, rejected = extract_prompt(record["chosen"], record["rejected"])
    _check_prompt_end(prompt)
    return prompt, chosen, rejected


def _check_prompt_end(prompt: Text) -> None:
    """A conversation prompt must end with a turn that the answer can follow (TRL's rule)."""
    if isinstance(prompt, list) and prompt[-1]["role"] not in ("user", "tool", "assistant"):
        raise ValueError(f"the prompt's last message has role {prompt[-1]['role']!r}; it must be 'user', 'tool' "
                         "(the answer is a new assistant turn) or 'assistant' (the answer continues it)")


def render_conversation(tokenizer, prompt: list, chosen: list, rejected: list,
                        chat_template_kwargs: Dict[str, Any] = None) -> Tuple[str, str, str]:
    """Prompt, chosen and rejected text of a conversational record, as TRL's ``apply_chat_template`` renders them.

    The prompt is rendered with the generation prompt (last turn ``user``/``tool``) or continuing its final message
    (last turn ``assistant``), then cut to its common start with each rendered ``prompt + answer``; each answer is
    the rest of its rendered ``prompt + answer``.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversational records (message lists) need a tokenizer with a chat template")
    kwargs = dict(chat_template_kwargs or {})
    continues = prompt[-1]["role"] == "assistant"
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=not continues,
                                         continue_final_message=continues, **kwargs)
    full = [tokenizer.apply_chat_template(prompt + answer, tokenize=False, **kwargs) for answer in (chosen, rejected)]
    for rendered in full:
        # some templates render the prompt alone differently (e.g. an extra token after the generation prompt)
        text = "".join(a for a, _ in takewhile(lambda pair: pair[0] == pair[1], zip(text, rendered)))
    return (text, *(rendered[len(text):] for rendered in full))
