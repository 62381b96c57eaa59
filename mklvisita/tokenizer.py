"""Tokenizers that work with no network.

A checkpoint always carries its tokenizer files, so loading one never downloads anything. A model whose text
encoder is a named transformers model (``bert-base-uncased``) uses that model's tokenizer, fetched once at build
time. A model with a built-in text encoder gets :func:`builtin_tokenizer`: a lower-casing WordPiece tokenizer
whose vocabulary is every printable ASCII character (alone and as a ``##`` continuation), so any caption
tokenizes without ``[UNK]`` after accent stripping, plus a list of whole caption words so common words stay one
token. Characters outside that set (CJK, emoji) become ``[UNK]``: accepted, never an error.
"""

from __future__ import annotations

import string

from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Frequent words of image captions (COCO/Flickr style), a superset of the shapes captions' words (a test holds
# it to that, so the tokenizer needs no import of a task); whole words keep captions short and make per-word
# explanations map one token to one word most of the time. Append only: a word's position is its token id.
CAPTION_WORDS = """
a an the and or of on in at to with without from by for near next beside behind above below under over
between left right top bottom middle center centre front back side up down inside outside around across
is are was were be being has have there this that these those it its their his her them they he she
one two three four five six seven eight nine ten several many some few all no not only both each other
small large big little tiny huge tall short long wide narrow round square circle triangle star cross
rectangle oval diamond heart ring shape shapes object objects thing things picture image photo
red green blue yellow purple orange pink brown black white gray grey cyan magenta gold silver dark light
bright colorful colored coloured striped wooden metal plastic glass
man woman men women person people child children boy girl baby player players group crowd team
dog dogs cat cats horse horses bird birds cow cows sheep elephant elephants giraffe giraffes zebra bear
car cars bus truck train plane airplane boat bike bicycle motorcycle street road sidewalk city building
table chair bed couch room kitchen food pizza cake plate bowl cup water beach ocean sea lake river snow
grass field tree trees park sky mountain hill wall window door sign light lights clock phone computer
ball frisbee kite surfboard skateboard skis umbrella hat shirt jacket dress bag
sitting standing walking running playing holding riding eating looking wearing jumping lying laying
flying swimming smiling talking carrying watching waiting parked covered filled made
single
""".split()


def _vocabulary(extra_words: list[str]) -> list[str]:
    chars = [c for c in string.printable if not c.isspace() and not c.isupper()]
    vocab: list[str] = list(SPECIAL_TOKENS)
    vocab += chars
    vocab += ["##" + c for c in chars]
    seen = set(vocab)
    for w in [*CAPTION_WORDS, *extra_words]:
        w = w.strip().lower()
        if w and w not in seen:
            seen.add(w)
            vocab.append(w)
    return vocab


def builtin_tokenizer(extra_words: list[str] | None = None, max_length: int = 32) -> BertTokenizerFast:
    """The offline WordPiece tokenizer of built-in text encoders (deterministic for the same words)."""
    vocab = {tok: i for i, tok in enumerate(_vocabulary(list(extra_words or [])))}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True, strip_accents=True)
    tok.model_max_length = max_length
    return tok


def load_tokenizer(path_or_name: str, **kwargs) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a checkpoint folder or a transformers id (the id needs the network or a cache)."""
    return AutoTokenizer.from_pretrained(path_or_name, **kwargs)
