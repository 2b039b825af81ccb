"""Text around the engine: chat templates, stop tokens, and incremental detokenisation with stop strings.

The engine works in token ids; this module turns prompts/messages into ids and ids back into
text deltas for streaming, holding back any suffix that could still become a stop string (or an
incomplete UTF-8 character) so a client never receives text that is later retracted.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime

from polychip.config import ConfigError
from polychip.infer import GenerationConfig, RequestError, builtin_generation_config, check_text

REPLACEMENT = "\ufffd"  # what a byte-level decoder yields for an incomplete UTF-8 sequence


def is_llama3(tok) -> bool:
    return tok.token_to_id("<|start_header_id|>") is not None and tok.token_to_id("<|eot_id|>") is not None


def stop_token_ids(tok) -> frozenset[int]:
    """Token ids that end generation for a polychip run folder (infer.builtin_generation_config)."""
    return builtin_generation_config(tok).eos_ids


def encode(tok, text: str, param: str = "prompt", special: bool = True) -> list[int]:
    """Token ids of `text` (special=False: without the post-processor's special tokens, as
    transformers encodes a rendered chat template). RequestError (a 400) for text no tokenizer
    accepts (lone surrogates).

    Through encode_batch because it releases the GIL while the Rust tokenizer works (encode holds
    it: ~1 s per MB, during which no other Python thread - the event loop - would run); the ids
    are the same."""
    return tok.encode_batch([check_text(text, param)], add_special_tokens=special)[0].ids


def encode_prompt(tok, gcfg: GenerationConfig, text: str, param: str = "prompt") -> list[int]:
    """A text prompt's ids: the tokenizer's post-processor, then the model's BOS rule."""
    return gcfg.prompt_ids(encode(tok, text, param))


def _raise_exception(message):
    from jinja2 import TemplateError

    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    """The template compiled the way transformers compiles chat templates: a sandbox that cannot touch
    Python internals or mutate its inputs, trim_blocks/lstrip_blocks, loop controls, tojson,
    raise_exception and strftime_now."""
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ModuleNotFoundError:
        raise ConfigError("chat templates need jinja2: pip install 'polychip[serve]'") from None

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def apply_template(gcfg: GenerationConfig, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The model's chat template rendered over `messages` (RequestError: it refused them, or it has none)."""
    if gcfg.chat_template is None:
        raise RequestError("this model has no chat template (no chat_template.jinja, no chat_template in "
                           "tokenizer_config.json); use /v1/completions with a prompt", "messages",
                           "no_chat_template")
    template = _compiled(gcfg.chat_template)
    from jinja2 import TemplateError

    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                    bos_token=gcfg.bos_token, eos_token=gcfg.eos_token)
    except TemplateError as e:
        raise RequestError(f"the model's chat template refused these messages: {e}", "messages") from None


def render_chat(tok, gcfg: GenerationConfig, messages: list[dict]) -> tuple[list[int], list[str]]:
    """messages [{"role", "content"}] -> (prompt ids ending where the assistant's reply starts,
    extra stop strings).

    A model with a chat template: the rendered text, encoded without adding special tokens (the
    template writes them, as transformers' apply_chat_template does). A polychip run folder has none:
    Llama-3 tokenizers get Meta's header/eot layout (the post-processor adds <|begin_of_text|>), others
    (the byte-level BPE `polychip train` builds has no chat tokens) a plain "Role: text" transcript
    ending in "Assistant:", stopping at the next "\nUser:" turn."""
    if not gcfg.builtin_chat:
        return encode(tok, apply_template(gcfg, messages), "messages", special=False), []
    if is_llama3(tok):
        text = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
                       for m in messages)
        text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
        return encode(tok, text, "messages"), []
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    return encode(tok, text, "messages"), ["\nUser:"]


class TextStream:
    """Feed token ids one at a time; get the text that is safe to send and whether a stop string hit."""

    def __init__(self, tok, stop: list[str]):
        self.tok = tok
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already returned
        self.text = ""
        self.stopped = False

    def add(self, token: int) -> str:
        """Append a token; returns the new text to send (possibly ""). Sets .stopped on a stop string."""
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            text = text[:min(hits)]
        self.text = text
        if self.stopped:
            return self._take(len(text))
        end = len(text)
        while end > self.sent and text[end - 1] == REPLACEMENT:
            end -= 1
        # Hold back the longest suffix that is a proper prefix of some stop string.
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, end - self.sent), hold, -1):
                if text[end - k:end] == s[:k]:
                    hold = k
                    break
        return self._take(end - hold)

    def flush(self) -> str:
        """At the end: whatever was held back (text that did not turn into a stop string)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out = self.text[self.sent:end]
        self.sent = end
        return out
