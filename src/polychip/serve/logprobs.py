"""OpenAI's two shapes of log-probabilities, from the engine's (log p, top ids, top log p) per token.

Completions (the legacy shape lm-evaluation-harness reads):
    {"tokens": [str], "token_logprobs": [float | None], "top_logprobs": [{str: float} | None],
     "text_offset": [int]}
Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}

A token's string is its own decoded text (so a token's entry and its key among the alternatives
match, which is how lm-eval decides whether a continuation is greedy); text_offset is where it
starts in the choice's text.
"""
from __future__ import annotations


def _text(tok, i: int) -> str:
    return tok.decode([i], skip_special_tokens=False)


def completion_logprobs(tok, ids: list[int], lps: list[tuple | None], offset: int = 0) -> dict:
    """ids and their engine log-probabilities (None: no logprob, as for a prompt's first token)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for i, lp in zip(ids, lps):
        s = _text(tok, i)
        out["tokens"].append(s)
        out["text_offset"].append(offset)
        offset += len(s)
        if lp is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        chosen, top_ids, top_lps = lp
        out["token_logprobs"].append(chosen)
        top = {_text(tok, t): v for t, v in zip(top_ids, top_lps)}
        top.setdefault(s, chosen)  # OpenAI: the chosen token is always among them
        out["top_logprobs"].append(top)
    return out


def merge_completion(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    return {k: a[k] + b[k] for k in a}


def _entry(tok, i: int, v: float) -> dict:
    s = _text(tok, i)
    return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8", "replace"))}


def chat_logprobs(tok, ids: list[int], lps: list[tuple | None]) -> dict:
    content = []
    for i, lp in zip(ids, lps):
        chosen, top_ids, top_lps = lp
        content.append({**_entry(tok, i, chosen), "top_logprobs": [_entry(tok, t, v) for t, v in zip(top_ids, top_lps)]})
    return {"content": content}
