"""Text around the engine: chat templates, stop tokens, and incremental detokenisation with stop strings.

The engine works in token ids; this module turns prompts/messages into ids and ids back into
text deltas for streaming, holding back any suffix that could still become a stop string (or an
incomplete UTF-8 character) so a client never receives text that is later retracted.
"""
from __future__ import annotations

from polychip.data.tokenizer import special_ids
from polychip.infer import check_text

REPLACEMENT = "\ufffd"  # what a byte-level decoder yields for an incomplete UTF-8 sequence


def is_llama3(tok) -> bool:
    return tok.token_to_id("<|start_header_id|>") is not None and tok.token_to_id("<|eot_id|>") is not None


def stop_token_ids(tok) -> frozenset[int]:
    """Token ids that end generation: eos, plus Llama-3's end-of-turn where the tokenizer has it."""
    ids = set()
    eos = special_ids(tok).get("eos")
    if eos is not None:
        ids.add(eos)
    eot = tok.token_to_id("<|eot_id|>")
    if eot is not None:
        ids.add(eot)
    return frozenset(ids)


def encode(tok, text: str, param: str = "prompt") -> list[int]:
    """Token ids of `text`. RequestError (a 400) for text no tokenizer accepts (lone surrogates).

    Through encode_batch because it releases the GIL while the Rust tokenizer works (encode holds
    it: ~1 s per MB, during which no other Python thread - the event loop - would run); the ids
    are the same."""
    return tok.encode_batch([check_text(text, param)])[0].ids


def render_chat(tok, messages: list[dict]) -> tuple[list[int], list[str]]:
    """messages [{"role", "content"}] -> (prompt ids ending where the assistant's reply starts,
    extra stop strings of the template).

    Llama-3 tokenizers get Meta's header/eot template (the tokenizer's post-processor adds
    <|begin_of_text|>). Others (the byte-level BPE `polychip train` builds has no chat tokens) get a
    plain "Role: text" transcript ending in "Assistant:", and stop at the next "\\nUser:" turn."""
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
