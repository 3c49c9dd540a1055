"""Text side: building CLIP tokenizers and text encoders for small vocabularies."""

from mgtq.text.tokenizer import build_word_tokenizer

__all__ = ["build_word_tokenizer"]
