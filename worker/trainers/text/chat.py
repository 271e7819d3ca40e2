"""Chat rendering with loss masks: which characters of a rendered conversation are the assistant's.

The conversation is rendered with a Jinja chat template (the tokenizer's, a built-in one named
in `data.chat_template`, or a literal template there). Assistant spans are found by rendering
incrementally: turn i's span runs from the end of `render(messages[:i], add_generation_prompt)`
to the end of `render(messages[:i+1])`, so it covers the reply and the template's end-of-turn
marker (the model learns to stop) but not the role header. This needs a template whose render
of a prefix is a prefix of the full render — true of ChatML, Llama 3, Mistral, Gemma, Qwen 2.5;
a template that is not fails the job with a message saying so.
"""

from __future__ import annotations

from typing import Any

from lorajobs.jobspecs.failures import UserDataError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Named templates a spec may use as `data.chat_template: <name>`.
CHAT_TEMPLATES: dict[str, str] = {"chatml": CHATML}


def resolve_chat_template(tokenizer: Any, name_or_template: str | None) -> str:
    """The Jinja template to render with: a built-in by name, a literal, or the tokenizer's."""
    if name_or_template is None:
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise UserDataError(
                "base model tokenizer has no chat template: set data.chat_template to a Jinja "
                f"template or a built-in name ({', '.join(sorted(CHAT_TEMPLATES))})"
            )
        if isinstance(template, dict):  # several named templates: use the default one
            template = template.get("default") or next(iter(template.values()))
        return str(template)
    if name_or_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name_or_template]
    if "{{" in name_or_template or "{%" in name_or_template:
        return name_or_template
    raise UserDataError(
        f"data.chat_template {name_or_template!r}: not a built-in template "
        f"({', '.join(sorted(CHAT_TEMPLATES))}) nor a Jinja template"
    )


def render(tokenizer: Any, template: str, messages: list[dict[str, str]], gen: bool) -> str:
    out = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=gen
    )
    return str(out)


def render_with_spans(
    tokenizer: Any, template: str, messages: tuple[dict[str, str], ...], where: str
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    msgs = list(messages)
    try:
        full = render(tokenizer, template, msgs, gen=False)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prefix = render(tokenizer, template, msgs[:i], gen=True)
            upto = render(tokenizer, template, msgs[: i + 1], gen=False)
            if not upto.startswith(prefix):
                raise UserDataError(
                    f"{where}: the chat template does not render turn by turn (a conversation's "
                    "prefix renders differently alone), so assistant tokens cannot be located; "
                    "set data.chat_template (e.g. chatml)"
                )
            if not full.startswith(upto):
                raise UserDataError(
                    f"{where}: the chat template renders the conversation differently from its "
                    "prefixes, so assistant tokens cannot be located; set data.chat_template"
                )
            spans.append((len(prefix), len(upto)))
    except UserDataError:
        raise
    except Exception as err:  # Jinja errors, raise_exception() in templates, bad roles
        raise UserDataError(f"{where}: chat template failed: {err}") from None
    return full, spans
