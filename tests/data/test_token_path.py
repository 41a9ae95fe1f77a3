"""Training builds its tokens through the processor's chat-template path and gives what the segment encoder gave.

`SupervisedEncoder` renders the template once per assistant turn to find where the answers start, expands the
placeholders itself and tiles each image itself. `ChatTemplateEncoder` asks
`processor.apply_chat_template(..., return_assistant_tokens_mask=True)`. On the SFT and MPO test corpora both give
the same input_ids, labels, tiles per span and pixel values, element for element, and the same errors.
"""

from __future__ import annotations

import pytest
import torch
from sft_data_helpers import processor  # noqa: F401  (fixture)
from token_path_corpus import hf_rows_corpus, mpo_corpus, outcome, sft_corpus

from internvl3_hf.data.encoding import ChatTemplateEncoder, SupervisedEncoder
from internvl3_hf.mpo import PreferenceEncoder


def assert_same(old: dict, new: dict, name: str) -> None:
    assert old.keys() == new.keys(), (name, old, new)
    for key in old:
        if key == "pixel_values" and old[key] is not None:
            assert new[key] is not None and torch.equal(old[key], new[key]), (name, key)
        else:
            assert old[key] == new[key], (name, key)


@pytest.mark.parametrize("with_pixels", [True, False], ids=["pixels", "planned"])
def test_sft_corpus_encodes_identically(tmp_path, processor, with_pixels):
    corpus = {**sft_corpus(tmp_path), **hf_rows_corpus()}
    old, new = SupervisedEncoder(processor, seed=5), ChatTemplateEncoder(processor, seed=5)
    errors = 0
    for name, sample in corpus.items():
        expected = outcome(lambda s: old.encode(s, with_pixels=with_pixels), sample)
        assert_same(expected, outcome(lambda s: new.encode(s, with_pixels=with_pixels), sample), name)
        errors += "error" in expected
    assert len(corpus) > 30 and 5 < errors < len(corpus) / 2


def test_sft_max_length_errors_agree(tmp_path, processor):
    corpus = sft_corpus(tmp_path)
    old, new = SupervisedEncoder(processor, 160, seed=1), ChatTemplateEncoder(processor, 160, seed=1)
    for name, sample in corpus.items():
        assert_same(outcome(old.encode, sample), outcome(new.encode, sample), name)


def test_mpo_corpus_encodes_identically(tmp_path, processor):
    corpus = mpo_corpus(tmp_path)
    old = PreferenceEncoder(processor, seed=0)
    new = ChatTemplateEncoder(processor, seed=0, video_frame_format="mpo")
    for name, pair in corpus.items():
        encoded = old.encode(pair)
        chosen, rejected = pair.samples()
        for row, sample in ((encoded.chosen, chosen), (encoded.rejected, rejected)):
            with_pixels = row is encoded.chosen  # the pair's tiles are kept once, with the chosen row
            expected = outcome(lambda _: row, None)
            assert_same(expected, outcome(lambda s: new.encode(s, with_pixels=with_pixels), sample), name)
    assert any("video" in name or pair.videos for name, pair in corpus.items())
