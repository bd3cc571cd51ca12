"""Chat templates: a conversation (a list of {"role", "content"} messages) as the text a chat model reads.

    chat = ChatFormat.from_folder("hf_folder")    # or ChatFormat.from_gguf(metadata), ChatFormat.create(jinja_source)
    prompt = chat.render(messages)                # ends with the assistant's turn opened, to generate the reply
    text = chat.render(messages, add_generation_prompt=False)   # the whole conversation, to train on

Templates are Jinja, as Hugging Face stores them (tokenizer_config.json's "chat_template", chat_template.jinja) and
as GGUF files do (tokenizer.chat_template), rendered in transformers' sandboxed environment; without one the
default "Role: content" format is used. The server, generate and the post-training data read conversations
through this one class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class ChatTemplateError(ValueError):
    """A chat template that refuses the messages it is given (its own raise_exception, or a Jinja error)."""


def default_chat_prompt(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The default template: "Role: content" paragraphs, then "Assistant:" for the model to continue."""
    turns = [f"{message['role'].capitalize()}: {message['content']}\n\n" for message in messages]
    return "".join(turns) + ("Assistant:" if add_generation_prompt else "")


@dataclass(frozen=True)
class ChatFormat:
    """A chat template (Jinja source, as Hugging Face stores it) with the special tokens it refers to;
    template None: `default_chat_prompt` (no Jinja needed)."""

    template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    _compiled: object = field(default=None, repr=False, compare=False)

    @classmethod
    def from_folder(cls, folder: str | Path | None) -> ChatFormat:
        """The template of a Hugging Face (or run) folder: chat_template.jinja, else tokenizer_config.json's
        "chat_template" (one string, or a list of named ones: "default" is taken); none: the default."""
        if folder is None:
            return cls()
        folder = Path(folder)
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if isinstance(template, list):
            named = {entry.get("name"): entry.get("template") for entry in template}
            template = named.get("default", next(iter(named.values()), None))
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        return cls.create(template, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))

    @classmethod
    def from_gguf(cls, metadata: dict) -> ChatFormat:
        """The template of a GGUF file's metadata (`llmjax.io.gguf.read_metadata`): "tokenizer.chat_template", with
        the BOS / EOS token texts its tokenizer.ggml.bos_token_id / eos_token_id name; none: template None
        (`require_template` reports it where a chat needs one)."""
        from llmjax.tokenizer.gguf import special_token_text

        return cls.create(metadata.get("tokenizer.chat_template"), special_token_text(metadata, "bos"),
                          special_token_text(metadata, "eos"))

    def require_template(self, model: str) -> ChatFormat:
        """Itself when it has a chat template; else the one error for a chat asked of `model` that has none."""
        if self.template is None:
            raise ValueError(f"{model} has no chat template (no tokenizer.chat_template / chat_template.jinja), so it "
                             "cannot chat; give one with --chat-template FILE, or prompt it with plain text")
        return self

    @classmethod
    def create(cls, template: str | None, bos_token: str = "", eos_token: str = "") -> ChatFormat:
        """Compile the template now, so a broken one fails at start-up, not on the first request. The Jinja
        environment is transformers': trimmed blocks, loop controls ({% break %}), its `tojson` (no HTML
        escaping), `raise_exception` and `strftime_now`."""
        if template is None:
            return cls(None, bos_token, eos_token)
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ImportError("this model's chat template is Jinja: pip install jinja2") from None
        import datetime

        import jinja2
        import jinja2.ext

        def raise_exception(message):
            raise jinja2.TemplateError(message)

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=[jinja2.ext.loopcontrols])
        environment.filters["tojson"] = tojson
        environment.globals["raise_exception"] = raise_exception
        environment.globals["strftime_now"] = lambda format: datetime.datetime.now().strftime(format)
        try:
            compiled = environment.from_string(template)
        except jinja2.TemplateError as error:
            raise ValueError(f"the chat template does not compile: {error}") from None
        return cls(template, bos_token, eos_token, compiled)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The conversation as the model reads it; add_generation_prompt: end with the assistant's turn opened (to
        generate a reply), else end after the last message (a whole conversation, to train on). ChatTemplateError
        when the template refuses the messages."""
        if self._compiled is None:
            return default_chat_prompt(messages, add_generation_prompt)
        import jinja2

        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"the chat template refused these messages: {error}") from None


def _token_text(token) -> str:
    """tokenizer_config.json writes special tokens as "<s>" or {"content": "<s>", ...}."""
    if isinstance(token, dict):
        return token.get("content", "")
    return token or ""
