"""Chat data: normalise conversations and render them with a chat template, assistant turns marked.

Two row shapes are read: OpenAI/ultrachat ``messages`` lists of ``{role, content}`` and ShareGPT
``conversations`` lists of ``{from, value}`` (``human``/``gpt`` roles). Both become one list of
``{role, content}`` messages with the roles ``system``, ``user``, ``assistant`` and ``tool``.

A conversation is rendered with the tokenizer's chat template, or with ``PLAIN_CHAT_TEMPLATE``
when the tokenizer has none. To find which characters belong to the assistant turns, every turn
is rendered twice: the history with the generation prompt (everything the model is shown before
it answers) and the history including the answer; the difference is the answer as the template
writes it, end-of-turn marker included. That needs a template whose rendering of the first k
messages is a prefix of the rendering of the whole conversation, which is true of the common
templates; a template that rewrites earlier turns gets a clear error instead of a wrong mask.
"""

from __future__ import annotations

from typing import Any

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

# Used when the tokenizer has no chat template of its own (GPT-2, T5, most base models). Each
# message is `<|role|>` on its own line, then the content; an assistant turn ends with the eos
# token so the student learns to stop; messages are separated by a newline. The generation prompt
# is `<|assistant|>` and a newline. The template is stored in the exported tokenizer, so the
# student is prompted at inference exactly as it was trained.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{% if messages %}{{ '\\n' }}{% endif %}{{ '<|assistant|>\\n' }}"
    "{% endif %}"
)

Message = dict[str, str]


def use_plain_template_if_missing(tokenizer: Any) -> bool:
    """Give ``tokenizer`` the plain chat template unless it has one; True if it was given."""
    if tokenizer.chat_template:
        return False
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return True


def normalise_conversation(value: Any, where: str) -> list[Message]:
    """``value`` (one cell of the conversation column) as ``{role, content}`` messages.

    Trailing messages after the last assistant turn are dropped: nothing is trained on them.
    ``where`` names the row for error messages (e.g. "train row 12").
    """
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
        content = turn.get("content", turn.get("value"))
        if role not in ROLE_ALIASES:
            raise ConfigError(
                f"{where}: unknown chat role {role!r}. Known roles: "
                f"{', '.join(ROLE_ALIASES)}. Rename the role in the data (e.g. 'bot' -> "
                "'assistant')."
            )
        messages.append({"role": ROLE_ALIASES[role], "content": "" if content is None else content})
    last_answer = last_assistant_turn(messages)
    return messages[: last_answer + 1] if last_answer is not None else []


def last_assistant_turn(messages: list[Message]) -> int | None:
    """Index of the last assistant message that answers something (is not the first message)."""
    answers = [i for i, m in enumerate(messages) if m["role"] == ASSISTANT and i > 0]
    return answers[-1] if answers else None


def _render(tokenizer: Any, messages: list[Message], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def chat_segments(
    messages: list[Message], tokenizer: Any, where: str, train_on_prompt: bool = False
) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, trained)`` pieces: the answers trained, the rest not
    (everything trained with ``train_on_prompt``).

    An assistant message that opens the conversation answers nothing and stays context. Returns
    ``[]`` when there is no answer or every answer is blank.
    """
    answers = [m["content"] for i, m in enumerate(messages) if m["role"] == ASSISTANT and i > 0]
    if not any(answer.strip() for answer in answers):
        return []
    full = _render(tokenizer, messages)
    if train_on_prompt:
        return [(full, True)]
    segments: list[tuple[str, bool]] = []
    done = 0  # characters of `full` already assigned to a segment
    for i, message in enumerate(messages):
        if message["role"] != ASSISTANT or i == 0:
            continue
        shown = _render(tokenizer, messages[:i], generation_prompt=True)
        answered = _render(tokenizer, messages[: i + 1])
        if not (full.startswith(answered) and answered.startswith(shown) and len(shown) >= done):
            raise ConfigError(
                f"{where}: the tokenizer's chat template does not render the conversation turn "
                "by turn (the first messages render differently once later ones follow), so the "
                "assistant turns can't be masked exactly. Pass --train_on_prompt to train on the "
                "whole rendered conversation, or give the tokenizer a template without that "
                "rewriting."
            )
        segments += [(full[done : len(shown)], False), (full[len(shown) : len(answered)], True)]
        done = len(answered)
    segments.append((full[done:], False))
    return [(text, trained) for text, trained in segments if text]


def chat_pair(messages: list[Message], tokenizer: Any) -> tuple[str, str] | None:
    """seq2seq: the rendered history up to the last answer as source, the answer as target."""
    last = last_assistant_turn(messages)
    if last is None or not messages[last]["content"].strip():
        return None
    return _render(tokenizer, messages[:last], generation_prompt=True), messages[last]["content"]
