"""Training tokens come from the processor's chat-template path and equal what the segment encoder gave.

The expected arrays in `tests/fixtures/token_path/` were written by an independent encoder, no longer in the tree
(`git show d32d46c:src/internvl3_hf/data/encoding.py`): it rendered the template once per assistant turn to find
where the answers start, expanded the placeholders and tiled each image itself, and tokenised the pieces apart.
`SupervisedEncoder` (`processor.apply_chat_template(..., return_assistant_tokens_mask=True)`) must give the same
input_ids, labels, tiles per span and pixel values, element for element, and the same errors, on the SFT and MPO
test corpora (`token_path_corpus.py`). Do not regenerate the arrays from the code they check.

The pixel values pin Pillow's bicubic resize and, for the augmented samples, its JPEG codec.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sft_data_helpers import processor  # noqa: F401  (fixture)
from token_path_corpus import hf_rows_corpus, mpo_corpus, outcome, sft_corpus

from internvl3_hf.data import SupervisedEncoder
from internvl3_hf.mpo import PreferenceEncoder

FIXTURE = Path(__file__).parents[1] / "fixtures" / "token_path"


@pytest.fixture(scope="module")
def expected():
    with np.load(FIXTURE / "expected.npz") as arrays:
        tensors = {key: arrays[key] for key in arrays.files}
    return tensors, json.loads((FIXTURE / "errors.json").read_text(encoding="utf-8"))


def assert_expected(expected, name: str, result: dict, root: Path, with_pixels: bool = True) -> None:
    arrays, errors = expected
    if "error" in result or name in errors:
        assert result.get("error", "").replace(str(root), "<root>") == errors.get(name), name
        return
    for key in ("input_ids", "labels", "image_num_patches"):
        np.testing.assert_array_equal(np.array(result[key], dtype=np.int64), arrays[f"{name}/{key}"], err_msg=name)
    pixels = result["pixel_values"]
    if not with_pixels or f"{name}/pixel_values" not in arrays:
        assert pixels is None, name
    else:
        np.testing.assert_array_equal(pixels.numpy(), arrays[f"{name}/pixel_values"], err_msg=name)


@pytest.mark.parametrize("with_pixels", [True, False], ids=["pixels", "planned"])
def test_sft_corpus(tmp_path, processor, expected, with_pixels):
    corpus = {**sft_corpus(tmp_path / "sft"), **hf_rows_corpus()}
    encoder = SupervisedEncoder(processor, seed=5)
    for name, sample in corpus.items():
        result = outcome(lambda s: encoder.encode(s, with_pixels=with_pixels), sample)
        assert_expected(expected, f"sft/{name}", result, tmp_path, with_pixels)
    arrays, errors = expected
    assert {key.split("/")[1] for key in arrays if key.startswith("sft/")} | {
        key.split("/", 1)[1] for key in errors if key.startswith("sft/")
    } == set(corpus)


def test_sft_corpus_too_long_for_max_length(tmp_path, processor, expected):
    encoder = SupervisedEncoder(processor, max_length=160, seed=1)
    _, errors = expected
    too_long = set()
    for name, sample in sft_corpus(tmp_path / "sft160").items():
        result = outcome(encoder.encode, sample)
        if "max_length" in result.get("error", ""):
            too_long.add(name)
            assert result["error"] == errors[f"sft-max-length-160/{name}"]
    assert too_long == {key.split("/", 1)[1] for key in errors if key.startswith("sft-max-length-160/")}


def test_mpo_corpus(tmp_path, processor, expected):
    encoder = PreferenceEncoder(processor, seed=0)
    corpus = mpo_corpus(tmp_path / "mpo")
    for name, pair in corpus.items():
        encoded = encoder.encode(pair)
        assert_expected(expected, f"mpo/{name}/chosen", outcome(lambda _: encoded.chosen, None), tmp_path)
        rejected = outcome(lambda _: encoded.rejected, None)
        assert_expected(expected, f"mpo/{name}/rejected", rejected, tmp_path, with_pixels=False)
    assert any(pair.videos for pair in corpus.values())
