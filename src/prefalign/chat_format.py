"""Give a base model a chat format: ChatML's special tokens and template (what the course's ORPO notebook calls).

TRL 1.13 removed ``setup_chat_format``; notebooks written against older TRL still call it, and a base model without
a chat template cannot read conversational data. This adds ``<|im_start|>`` / ``<|im_end|>`` as special tokens
(``<|im_start|>`` the beginning-of-sequence token, ``<|im_end|>`` the end-of-sequence and padding token, as TRL's
``setup_chat_format`` did), sets the ChatML
template, and resizes the model's token embeddings (optionally to a multiple, for tensor-core friendly shapes).
"""

from __future__ import annotations

from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_FORMATS = {"chatml": ("<|im_start|>", "<|im_end|>", CHATML_TEMPLATE)}


def setup_chat_format(model: Any, tokenizer: Any, format: str = "chatml",
                      resize_to_multiple_of: int | None = None) -> tuple[Any, Any]:
    """``model, tokenizer = setup_chat_format(model, tokenizer)``: ChatML for a model without a chat template.

    Refuses a tokenizer that already has a template (replacing it would silently change what a chat model was
    trained on). The model's config and generation config get the new token ids.
    """
    from .errors import ConfigError

    if format not in CHAT_FORMATS:
        raise ConfigError(f"chat format {format!r} is not known. Fix: use one of {', '.join(CHAT_FORMATS)}")
    if getattr(tokenizer, "chat_template", None):
        raise ConfigError("this tokenizer already has a chat template; setup_chat_format would replace it. Fix: use "
                          "the model's own template, or set tokenizer.chat_template = None first to replace it")
    start, end, template = CHAT_FORMATS[format]
    # as TRL's setup_chat_format did: BOS <|im_start|>, EOS and padding <|im_end|>
    tokenizer.add_special_tokens({"bos_token": start, "eos_token": end, "pad_token": end,
                                  "additional_special_tokens": [start, end]})
    tokenizer.chat_template = template
    size = len(tokenizer)
    if resize_to_multiple_of:
        size = -(-size // resize_to_multiple_of) * resize_to_multiple_of
    model.resize_token_embeddings(size)
    for config in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if config is not None:
            config.bos_token_id = tokenizer.bos_token_id
            config.eos_token_id = tokenizer.eos_token_id
            config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


TEMPLATE_FILE_SUFFIXES = (".jinja", ".j2", ".txt")


def _is_jinja(spec: str) -> bool:
    return "{%" in spec or "{{" in spec


def _is_tokenizer_source(spec: str) -> bool:
    """A model directory (one with a tokenizer) or a hub id (``owner/name``, not a path that exists)."""
    import re
    from pathlib import Path

    if _is_jinja(spec) or "\n" in spec or len(spec) > 1024:
        return False
    path = Path(spec).expanduser()
    if path.is_dir():
        return (path / "tokenizer_config.json").is_file()
    return not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None and path.suffix.lower() \
        not in TEMPLATE_FILE_SUFFIXES


def clone_chat_template(model: Any, tokenizer: Any, source: str) -> bool:
    """TRL's ``chat_template_path`` given a model directory or hub id (its clone_chat_template): that tokenizer's
    chat template, the added tokens it has and this one lacks, and its EOS (the model's and generation EOS too);
    the embeddings grow to the new vocabulary (TRL also rounds them up to a multiple of 64; here they are not).
    Returns whether the vocabulary was resized."""
    from .errors import ConfigError
    from .models import load_tokenizer

    other = load_tokenizer(source)
    template = getattr(other, "chat_template", None)
    if not template:
        raise ConfigError(f"chat_template_path={source!r}: that tokenizer has no chat template. Fix: name a chat "
                          "model's directory or hub id, or a .jinja file")
    tokenizer.chat_template = template
    vocab = tokenizer.get_vocab()
    tokenizer.add_tokens([t for t in other.added_tokens_decoder.values() if t.content not in vocab])
    if other.eos_token is not None:
        tokenizer.eos_token = other.eos_token
        model.config.get_text_config().eos_token_id = tokenizer.eos_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id
    before = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > before:
        model.resize_token_embeddings(len(tokenizer))
    return model.get_input_embeddings().weight.shape[0] != before


def check_chat_template_option(spec: str) -> None:
    """The ``chat_template`` option's form, checked when the config is built (before anything loads)."""
    from pathlib import Path

    from .errors import ConfigError

    if spec in CHAT_FORMATS or _is_jinja(spec) or _is_tokenizer_source(spec):
        return
    path = Path(spec).expanduser()
    if path.suffix.lower() not in TEMPLATE_FILE_SUFFIXES or not path.is_file():
        what = "no such file" if not path.exists() else "not a .jinja / .j2 / .txt file"
        raise ConfigError(f"chat_template={spec!r}: {what}. Fix: use 'chatml', a Jinja template string, the path "
                          "of a .jinja / .j2 / .txt file holding one, or a model directory / hub id whose tokenizer's "
                          "template to use")


def apply_chat_template_option(model: Any, tokenizer: Any, spec: str | None, *, source: str = "the model") -> bool:
    """Set the ``chat_template`` option (see `prefalign.config.TrainConfig`) on ``tokenizer`` (and ``model``).

    ``"chatml"`` is `setup_chat_format` (tokens added, embeddings resized); a Jinja string or file replaces the
    template, as alignment-handbook and TRL do. Returns whether the vocabulary was resized.
    """
    from pathlib import Path

    from .errors import ConfigError

    if spec is None:
        return False
    check_chat_template_option(spec)
    if spec in CHAT_FORMATS:
        if getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"chat_template: {spec}: the tokenizer of {source} already has a chat template, which "
                              "this would replace. Fix: remove chat_template to use the model's own, or give a Jinja "
                              "string to replace it")
        before = model.get_input_embeddings().weight.shape[0]
        setup_chat_format(model, tokenizer, spec)
        return model.get_input_embeddings().weight.shape[0] != before
    if _is_tokenizer_source(spec):
        return clone_chat_template(model, tokenizer, spec)
    text = spec if _is_jinja(spec) else Path(spec).expanduser().read_text(encoding="utf-8")
    tokenizer.chat_template = text
    return False
