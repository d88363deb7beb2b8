"""Chat data: normalise conversations and render them with a chat template, answers marked.

Three row shapes are read: OpenAI/ultrachat ``messages`` lists of ``{role, content}``, ShareGPT
``conversations`` lists of ``{from, value}`` (``human``/``gpt`` roles), and TRL's conversational
prompt/completion (a ``prompt`` list of messages and a ``completion`` list or string). All become
one list of ``{role, content, ...}`` messages with the roles ``system``, ``user``, ``assistant``
and ``tool``; other keys (``tool_calls``, ``name``...) are passed on to the template.

A conversation is rendered with the tokenizer's chat template (the teacher's when the student
has none; ``plain_chat_template`` when neither has one). To find which characters belong to the
answers, every answer is rendered twice: the history with the generation prompt (what the model
is shown before it answers) and the history including the answer; the difference is the answer
as the template writes it, end-of-turn marker included. When the renderings of successive turns
are prefixes of the whole conversation (true of most templates) the conversation is one example
with every answer trained; a template that rewrites earlier turns once later ones follow (Qwen3
drops past reasoning, for one) gets one example per answer, each its own history plus that
answer, which is exactly what the model sees when it produces that answer.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from kd_dist.config import ConfigError

SYSTEM, USER, ASSISTANT, TOOL = "system", "user", "assistant", "tool"

# Role names found in the wild -> the role the chat templates know.
ROLE_ALIASES = {
    SYSTEM: SYSTEM,
    USER: USER,
    "human": USER,
    ASSISTANT: ASSISTANT,
    "gpt": ASSISTANT,
    TOOL: TOOL,
}

# The plain template, used when neither tokenizer has a chat template (GPT-2, T5, most base
# models). Each message is `<|role|>` on its own line, then the content; an assistant turn ends
# with the eos token so the student learns to stop; messages are separated by a newline; the
# generation prompt is `<|assistant|>` and a newline. It starts with the bos token when the
# tokenizer adds one to plain text (Llama), so that prompting the exported student with
# `apply_chat_template` gives exactly the tokens it was trained on.
_PLAIN_CHAT_BODY = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{% if messages %}{{ '\\n' }}{% endif %}{{ '<|assistant|>\\n' }}"
    "{% endif %}"
)


def plain_chat_template(with_bos: bool) -> str:
    return ("{{ bos_token }}" if with_bos else "") + _PLAIN_CHAT_BODY


Message = dict[str, Any]
Pieces = list[tuple[str, bool]]  # rendered text as (text, trained) pieces


def _content(value: Any, where: str) -> str:
    """A message's content as text: a string, null (empty) or a list of OpenAI text parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        kinds = {p.get("type") for p in value}
        if kinds <= {"text"}:
            return "".join(p.get("text") or "" for p in value)
        raise ConfigError(
            f"{where}: a message has content parts of type {', '.join(sorted(map(str, kinds)))}; "
            "only text parts can be distilled into a language model."
        )
    raise ConfigError(
        f"{where}: a message's content is {type(value).__name__}, expected text (or a list "
        "of text parts)."
    )


def normalise_conversation(value: Any, where: str) -> list[Message]:
    """``value`` (a cell holding a conversation) as ``{role, content, ...}`` messages.

    ``where`` names the example for error messages (e.g. "train example 12"). Keys with null
    values are left out: Arrow gives every message every key any message has, and templates test
    keys such as ``tool_calls`` with ``is defined``.
    """
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(
            f"{where}: the conversation cell holds {type(value).__name__}, expected a list of "
            "{role, content} (or ShareGPT {from, value}) messages."
        )
    messages = []
    for turn in value:
        if not isinstance(turn, dict):
            raise ConfigError(f"{where}: a message is {type(turn).__name__}, expected a dict.")
        role = turn.get("role", turn.get("from"))
        if role not in ROLE_ALIASES:
            raise ConfigError(
                f"{where}: unknown chat role {role!r} in message {turn!r:.120}. Known roles: "
                f"{', '.join(ROLE_ALIASES)}. Rename the role in the data (e.g. 'bot' -> "
                "'assistant')."
            )
        extra = {
            k: v
            for k, v in turn.items()
            if v is not None and k not in ("role", "from", "content", "value")
        }
        content = _content(turn.get("content", turn.get("value")), where)
        messages.append({**extra, "role": ROLE_ALIASES[role], "content": content})
    return messages


def conversation_from_pair(prompt: Any, completion: Any, where: str) -> list[Message]:
    """TRL's conversational prompt/completion: the prompt messages, then the completion (a list
    of messages, or a string taken as the assistant's answer)."""
    if isinstance(completion, str):
        completion = [{"role": ASSISTANT, "content": completion}]
    return normalise_conversation(prompt, where) + normalise_conversation(completion, where)


def is_answer(index: int, message: Message) -> bool:
    """Whether a message is trained on: an assistant turn that answers something (is not the
    first message), has text, and is not weighted 0 (OpenAI's fine-tuning format excludes a turn
    with ``weight: 0``). A turn of tool calls only stays context: not every template renders
    tool calls, and an empty answer would teach the student to stop at once."""
    return (
        message["role"] == ASSISTANT
        and index > 0
        and message.get("weight", 1) != 0
        and bool(message["content"].strip())
    )


def _render(
    tokenizer: Any, messages: list[Message], where: str, generation_prompt: bool = False
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except TemplateError as error:
        roles = " -> ".join(m["role"] for m in messages)
        raise ConfigError(
            f"{where}: the chat template refused the conversation ({roles}): {error}. Fix the "
            "rows it can't render, or give the tokenizer a template that accepts them."
        ) from None


def chat_examples(
    messages: list[Message], tokenizer: Any, where: str, train_on_prompt: bool = False
) -> list[Pieces]:
    """The conversation as examples of ``(text, trained)`` pieces, answers trained (everything
    with ``train_on_prompt``); ``[]`` when it has no answer. Messages after the last answer are
    left out: nothing would be trained on them."""
    answers = [i for i, m in enumerate(messages) if is_answer(i, m)]
    if not answers:
        return []
    messages = messages[: answers[-1] + 1]
    full = _render(tokenizer, messages, where)
    if train_on_prompt:
        return [[(full, True)]]
    turns = [
        (
            _render(tokenizer, messages[:i], where, generation_prompt=True),
            _render(tokenizer, messages[: i + 1], where),
        )
        for i in answers
    ]
    for shown, answered in turns:
        if not answered.startswith(shown):
            raise ConfigError(
                f"{where}: with the tokenizer's chat template, a conversation ending in an answer "
                "does not start with the same conversation rendered up to the generation prompt, "
                "so the answer can't be told apart from the prompt. Pass --train_on_prompt to "
                "train on whole conversations, or use a template without that rewriting."
            )
    if _renders_turn_by_turn(full, turns):
        pieces: Pieces = []
        done = 0  # characters of `full` already in a piece
        for shown, answered in turns:
            pieces += [(full[done : len(shown)], False), (full[len(shown) : len(answered)], True)]
            done = len(answered)
        return [[(text, trained) for text, trained in pieces if text]]
    return [[(shown, False), (answered[len(shown) :], True)] for shown, answered in turns]


def _renders_turn_by_turn(full: str, turns: list[tuple[str, str]]) -> bool:
    """Whether each turn's renderings are successive prefixes of the whole conversation."""
    done = 0
    for shown, answered in turns:
        if not (full.startswith(answered) and len(shown) >= done):
            return False
        done = len(answered)
    return True


def chat_pair(messages: list[Message], tokenizer: Any, where: str) -> tuple[str, str] | None:
    """seq2seq: the rendered history up to the last answer with text as the source, that
    answer as the target; None when there is none."""
    answers = [i for i, m in enumerate(messages) if is_answer(i, m)]
    if not answers:
        return None
    last = answers[-1]
    source = _render(tokenizer, messages[:last], where, generation_prompt=True)
    return source, messages[last]["content"]


# Any text the templates copy verbatim: it only marks where the answer's own text ends.
_PROBE_ANSWER = "kd_dist probe answer"


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The token the chat template ends an answer with, which the student learns to produce and
    generation must stop at: the first special (or added) token after the answer's text in a
    rendered one-turn conversation. None when the template writes none there, or refuses the
    probe conversation."""
    messages = [{"role": USER, "content": "Hi"}, {"role": ASSISTANT, "content": _PROBE_ANSWER}]
    try:
        answered = _render(tokenizer, messages, "the end-of-turn probe")
    except ConfigError:
        return None
    end = answered.rfind(_PROBE_ANSWER)
    if end < 0:
        return None
    after = answered[end + len(_PROBE_ANSWER) :]
    specials = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    return next((token for token in ids if token in specials), None)
