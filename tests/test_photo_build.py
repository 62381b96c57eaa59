"""training.wordnet: the WordNet hierarchy read with no NLTK, and each synset's ImageNet-1k classes."""

from __future__ import annotations

from training.wordnet import read_hypernyms, synset_classes

# Four noun synsets in data.noun's format: offset, lex file, pos, word count (hex), words, pointer count, pointers.
DATA_NOUN = """  1 This software and database is being provided to you, the LICENSEE, by Princeton University
00000001 03 n 01 entity 0 000 | that which is perceived
00000002 05 n 01 antelope 0 001 @ 00000001 n 0000 | graceful Old World ruminant
00000003 05 n 02 gnu 0 wildebeest 0 001 @ 00000002 n 0000 | large African antelope
00000004 05 n 01 impala 0 001 @ 00000002 n 0000 | African antelope
00000005 05 n 01 gazelle 0 002 @ 00000002 n 0000 ~ 00000001 n 0000 | small swift graceful antelope
00000006 05 n 01 rock 0 001 @i 00000001 n 0000 | a stone
"""


def test_hypernyms_are_read_from_data_noun(tmp_path):
    path = tmp_path / "data.noun"
    path.write_text(DATA_NOUN, encoding="latin-1")
    h = read_hypernyms(path)
    assert h["n00000003"] == ["n00000002"]  # gnu -> antelope
    assert h["n00000005"] == ["n00000002"]  # the hyponym pointer (~) is not a hypernym
    assert h["n00000006"] == ["n00000001"]  # instance hypernym
    assert h["n00000001"] == []


def test_a_synset_maps_to_the_classes_under_its_nearest_ancestor_that_has_any(tmp_path):
    path = tmp_path / "data.noun"
    path.write_text(DATA_NOUN, encoding="latin-1")
    h = read_hypernyms(path)
    classes = ["n00000004", "n00000005"]  # impala, gazelle are "ImageNet-1k" here
    out = synset_classes(["n00000003", "n00000004", "n00000002", "n00000006"], classes, h, max_classes=2)
    assert out["n00000003"] == [0, 1]  # gnu -> antelope -> impala, gazelle
    assert out["n00000004"] == [0]  # a class maps to itself
    assert out["n00000002"] == [0, 1]
    assert out["n00000006"] == [0, 1]  # rock -> entity -> everything
    assert "n00000006" not in synset_classes(["n00000006"], classes, h, max_classes=1)  # too vague: left out
