"""The paper's default noise level and its per-model cache.

The level is NOISE_STD_FACTOR x the std of the token embeddings of a broad
sample of subjects (DEFAULT_NOISE_SUBJECTS); the engine holds one cache:

    cache = NoiseCache()
    cache.get(loaded)             # computed on the first call for a model, remembered after
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import torch

from ..errors import InvalidRequest
from ..loading import LoadedModel

log = logging.getLogger(__name__)

NOISE_STD_FACTOR = 3.0  # the paper: noise std = 3 x the std of subject-token embeddings

# Well-known entities whose token embeddings set the default noise level
# (the paper uses the subjects of its 1,209 known facts; any broad sample works).
# fmt: off
DEFAULT_NOISE_SUBJECTS: tuple[str, ...] = (
    "Eiffel Tower", "Barack Obama", "Microsoft", "Albert Einstein", "Mount Everest",
    "Amazon River", "William Shakespeare", "Toyota", "Leonardo da Vinci", "Great Wall of China",
    "Apple", "Nelson Mandela", "the Beatles", "Statue of Liberty", "Google",
    "Pablo Picasso", "Sahara Desert", "Coca-Cola", "Isaac Newton", "Taj Mahal",
    "Mozart", "Pacific Ocean", "Sony", "Napoleon Bonaparte", "Colosseum",
    "Marie Curie", "Nike", "Charles Darwin", "Danube", "Volkswagen",
    "Big Ben", "Mahatma Gandhi", "Samsung", "Winston Churchill", "Mount Kilimanjaro",
    "Beethoven", "IBM", "Vincent van Gogh", "Lake Victoria", "Nintendo",
    "Abraham Lincoln", "Louvre", "BMW", "Cleopatra", "Golden Gate Bridge",
    "Michael Jordan", "Intel", "Frida Kahlo", "Stonehenge", "Harvard University",
)
# fmt: on


@torch.inference_mode()
def noise_level(loaded: LoadedModel, subjects: Sequence[str] | None = None) -> float:
    """The paper's default noise: NOISE_STD_FACTOR x std of the subjects' token embeddings."""
    subjects = list(subjects or DEFAULT_NOISE_SUBJECTS)
    ids = [i for s in subjects for i in loaded.tokenizer(s, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise InvalidRequest("noise_level needs at least one subject with tokens")
    emb = loaded.spec.embedding(loaded.model)(torch.tensor(ids, device=loaded.device))  # (N, D)
    return NOISE_STD_FACTOR * float(emb.float().std())


class NoiseCache:
    """Default noise levels by model, computed once each; the engine holds one.

    cache = NoiseCache()
    cache.get(loaded)   # computed on the first call, remembered after
    """

    def __init__(self, subjects: Sequence[str] | None = None) -> None:
        self._subjects = tuple(subjects or DEFAULT_NOISE_SUBJECTS)
        self._levels: dict[tuple[str, tuple[int, ...]], float] = {}
        self._lock = threading.Lock()

    def get(self, loaded: LoadedModel) -> float:
        # ROME edits MLP weights only, so the embeddings (and this level) never change.
        key = (loaded.model_id, tuple(loaded.spec.embedding(loaded.model).weight.shape))
        with self._lock:
            if key not in self._levels:
                self._levels[key] = noise_level(loaded, self._subjects)
                log.info("noise level for %s: %.4f", loaded.model_id, self._levels[key])
            return self._levels[key]


def resolve_noise(loaded: LoadedModel, noise: float | None, noise_cache: NoiseCache | None) -> float:
    """``noise`` if given, else the default level (from ``noise_cache`` when there is one)."""
    if noise is not None:
        return noise
    return noise_cache.get(loaded) if noise_cache is not None else noise_level(loaded)
