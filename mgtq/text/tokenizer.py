"""A real `CLIPTokenizer` for a small closed vocabulary.

CLIP's tokenizer is byte-pair encoding over a vocabulary and a merge list. For a grammar of a few
dozen words we build both ourselves: every lowercase letter and digit (alone and as a
word end, so any text still tokenizes) plus, per word, the chain of merges that spells it. Pipelines
then load it with `CLIPTokenizer.from_pretrained`, exactly as they load Meissonic's. transformers
has no builder for such a vocabulary, hence this module.
"""

from __future__ import annotations

import string
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _symbols(word: str) -> list[str]:
    return list(word[:-1]) + [word[-1] + "</w>"]


def build_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab {token: id} and ordered merges spelling each word left to right."""
    base = sorted(set(string.ascii_lowercase + string.digits + ",.'"))
    tokens: list[str] = []
    seen: set[str] = set()

    def add(tok: str):
        if tok not in seen:
            seen.add(tok)
            tokens.append(tok)

    for ch in base:
        add(ch)
    for ch in base:
        add(ch + "</w>")
    merges: list[tuple[str, str]] = []
    merge_set: set[tuple[str, str]] = set()
    for word in sorted(set(w.lower() for w in words)):
        if not word or not all(c in base for c in word):
            raise ValueError(f"vocabulary word {word!r} must be non-empty lowercase letters/digits")
        syms = _symbols(word)
        current = syms[0]
        for nxt in syms[1:]:
            pair = (current, nxt)
            current = current + nxt
            if pair not in merge_set:
                merge_set.add(pair)
                merges.append(pair)
            add(current)
    add(BOS)
    add(EOS)
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_word_tokenizer(words: list[str], out_dir: str | Path | None = None, max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary spells `words`; saved to `out_dir` if given."""
    vocab, merges = build_vocab_and_merges(words)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, unk_token=EOS, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                        model_max_length=max_length)
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok
