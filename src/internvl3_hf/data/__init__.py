"""Training data: sources (official meta/JSONL, HF datasets), encoding, packing, collation."""

from .collator import SFTCollator
from .dataset import SFTDataset
from .encoding import IGNORE_INDEX, EncodedSample, SupervisedEncoder
from .errors import DataError, DataErrorReason
from .packing import pack_samples
from .sources import Sample, Source, mix_sources, read_official_meta, samples_from_hf_dataset

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "DataErrorReason",
    "EncodedSample",
    "SFTCollator",
    "SFTDataset",
    "Sample",
    "Source",
    "SupervisedEncoder",
    "mix_sources",
    "pack_samples",
    "read_official_meta",
    "samples_from_hf_dataset",
]
