"""OpenAI's two shapes of log-probabilities, from the engine's (log p, top ids, top log p) per token.

Completions (the legacy shape lm-evaluation-harness reads):
    {"tokens": [str], "token_logprobs": [float | None], "top_logprobs": [{str: float} | None],
     "text_offset": [int]}
Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}

A token's string is its own decoded text (so a token's entry and its key among the alternatives
match, which is how lm-eval decides whether a continuation is greedy), or, for a token that is only
part of a UTF-8 character, OpenAI's "bytes:\\xNN" spelling of its bytes (otherwise every such token
would be the same "\ufffd" key and alternatives would overwrite each other). text_offset is where
it starts in the choice's text (exact while tokens are whole characters).
"""
from __future__ import annotations

import functools
import re

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (printable stand-ins for the 256 bytes), inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


@functools.lru_cache(maxsize=1 << 16)
def _token(tok, i: int) -> tuple[str, bytes, int]:
    """(the token's string, its UTF-8 bytes, characters it adds to decoded text: 1 for a partial one)."""
    s = tok.decode([i], skip_special_tokens=False)
    if "\ufffd" not in s:
        return s, s.encode("utf-8"), len(s)
    raw = tok.id_to_token(i) or ""
    m = _BYTE_FALLBACK.fullmatch(raw)
    dec = _byte_decoder()
    if m:
        data = bytes([int(m.group(1), 16)])
    elif raw and all(c in dec for c in raw):
        data = bytes(dec[c] for c in raw)
    else:
        return s, s.encode("utf-8"), len(s)
    return "bytes:" + "".join(f"\\x{b:02x}" for b in data), data, len(s)


def _text(tok, i: int) -> str:
    return _token(tok, i)[0]


def completion_logprobs(tok, ids: list[int], lps: list[tuple | None], offset: int = 0) -> tuple[dict, int]:
    """ids and their engine log-probabilities (None: no logprob, as for a prompt's first token), the
    first starting at text offset `offset` -> (the logprobs object, the offset after the last token)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for i, lp in zip(ids, lps):
        s, _, width = _token(tok, i)
        out["tokens"].append(s)
        out["text_offset"].append(offset)
        offset += width
        if lp is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        chosen, top_ids, top_lps = lp
        out["token_logprobs"].append(chosen)
        top = {_text(tok, t): v for t, v in zip(top_ids, top_lps)}
        top.setdefault(s, chosen)  # OpenAI: the chosen token is always among them
        out["top_logprobs"].append(top)
    return out, offset


def merge_completion(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    return {k: a[k] + b[k] for k in a}


def _entry(tok, i: int, v: float) -> dict:
    s, data, _ = _token(tok, i)
    return {"token": s, "logprob": v, "bytes": list(data)}


def chat_logprobs(tok, ids: list[int], lps: list[tuple | None]) -> dict:
    content = []
    for i, lp in zip(ids, lps):
        chosen, top_ids, top_lps = lp
        content.append({**_entry(tok, i, chosen), "top_logprobs": [_entry(tok, t, v) for t, v in zip(top_ids, top_lps)]})
    return {"content": content}
