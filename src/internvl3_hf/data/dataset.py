"""A map-style training dataset over `Sample`s: planned once (lengths, bad samples), encoded on access."""

from __future__ import annotations

import logging
from collections import Counter

from torch.utils.data import Dataset

from .encoding import EncodedSample, SupervisedEncoder
from .errors import DataError, drop_reason
from .packing import pack_samples
from .sources import Sample

logger = logging.getLogger(__name__)


class SFTDataset(Dataset):
    """Items are lists of encoded samples: one sample each, or a packed group with `max_packed_tokens`.

    Bad samples (missing or corrupt image, placeholder count mismatch, unknown role, empty conversation, too long,
    nothing to learn) are dropped at construction, each logged with its origin and counted in `dropped`;
    `on_error="raise"` raises on the first one instead. A sample that only fails when its pixels are decoded
    during training is logged, counted and skipped, so a long run never stops halfway.
    """

    def __init__(
        self,
        samples: list[Sample],
        encoder: SupervisedEncoder,
        max_packed_tokens: int | None = None,
        max_packed_tiles: int | None = None,
        on_error: str = "drop",
    ):
        if on_error not in ("drop", "raise"):
            raise ValueError(f"on_error must be 'drop' or 'raise', got {on_error!r}.")
        self.encoder = encoder
        self.on_error = on_error
        self.dropped: Counter[str] = Counter()
        self.samples, lengths, tiles = self._plan(samples)
        if max_packed_tokens is not None:
            self.groups = pack_samples(lengths, tiles, max_packed_tokens, max_packed_tiles)
        else:
            self.groups = [[index] for index in range(len(self.samples))]
        self.lengths = [sum(lengths[index] for index in group) for group in self.groups]
        logger.info(
            "SFT dataset: %d samples in %d items, %d dropped %s", len(self.samples), len(self.groups),
            sum(self.dropped.values()), dict(self.dropped),
        )

    def _plan(self, samples: list[Sample]) -> tuple[list[Sample], list[int], list[int]]:
        kept, lengths, tiles = [], [], []
        for sample in samples:
            try:
                encoded = self.encoder.encode(sample, with_pixels=False)
            except DataError as error:
                self._report(error)
                continue
            kept.append(sample)
            lengths.append(len(encoded.input_ids))
            tiles.append(encoded.num_tiles)
        if not kept:
            raise ValueError(f"No usable training sample: all {len(samples)} were dropped ({dict(self.dropped)}).")
        return kept, lengths, tiles

    def _report(self, error: DataError) -> None:
        if self.on_error == "raise":
            raise error
        self.dropped[drop_reason(error)] += 1
        logger.warning("dropped sample: %s", error)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> list[EncodedSample]:
        for attempt in range(len(self.groups)):
            encoded = []
            for sample_index in self.groups[(index + attempt) % len(self.groups)]:
                try:
                    encoded.append(self.encoder.encode(self.samples[sample_index]))
                except DataError as error:
                    self._report(error)
            if encoded:
                return encoded
        raise RuntimeError("Every training sample failed to load; see the warnings above.")

