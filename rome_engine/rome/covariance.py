"""C = E[k k^T]: the uncentred second moment of the edited projection's inputs.

ROME solves for the rank-one update that writes v* at k* while disturbing
the other keys k least "on average", which is measured by C (Meng et al.
2022, eq. 2). C is estimated over a text sample:

* a local corpus when the ``RomeCache`` has one (a .txt split at blank lines,
  or a .jsonl with a "text" field per line); otherwise
* text the model samples itself (temperature 0.9, seeded), so that
  it works offline; generated once per model and cached as JSONL.

Each forward pass stops right after the edited projection (nothing above it
is needed). Keys are summed batch by batch in float32 (``k^T k`` per batch)
into a float64 running total, whatever the model's dtype. C is computed once
per (model, layer, token count, text source) and cached as safetensors.

    C, from_cache = layer_covariance(loaded, layer=6, hp=hp, cache=cache)   # (D_in, D_in)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..fileio import atomic_write_with
from ..hooks import Trace, run_until_stopped, stop_after
from ..loading import LoadedModel
from .cache import ProgressFn, RomeCache, file_digest
from .hparams import RomeHParams

log = logging.getLogger(__name__)

# Openings of the self-sampled text: varied, so that the sample is not all one genre.
TEXT_SEEDS = (
    "The", "In", "A", "It", "He", "She", "This", "When", "After", "According to", "Many", "One",
    "There", "His", "Her", "Some", "During", "Although", "If", "We", "They", "Born in", "The city of",
    "The company", "Scientists", "Today", "On", "As", "For", "At", "History", "Music",
)  # fmt: skip
GEN_BATCH = 64  # sequences sampled per generate() call
SAMPLE_TEMPERATURE = 0.9  # a little below 1: fewer derailed texts, and no per-step sort as top-p needs


def layer_covariance(
    loaded: LoadedModel,
    layer: int,
    hp: RomeHParams,
    cache: RomeCache,
    *,
    progress: ProgressFn | None = None,
) -> tuple[torch.Tensor, bool]:
    """C of ``layer`` as float32 (D_in, D_in) on the model's device, and whether it came from a cache."""
    path = covariance_path(loaded, layer, hp, cache)
    source = text_source_id(cache)
    from_disk = False

    def load_or_compute() -> torch.Tensor:
        nonlocal from_disk
        if path.exists():
            try:
                c = load_file(str(path))["C"]
                from_disk = True
                log.info("C of layer %d read from %s", layer, path)
                return c
            except Exception as e:  # a corrupt file: compute it again
                log.warning("ignoring the unreadable covariance file %s: %s", path, e)
        t0 = time.perf_counter()
        texts = source_texts(loaded, hp, cache, progress=progress)
        c, count = second_moment(
            loaded, layer, texts, n_tokens=hp.mom2_n_tokens, seq_len=hp.mom2_seq_len,
            batch_size=hp.mom2_batch_size, progress=progress,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        meta = {"model_id": loaded.model_id, "layer": str(layer), "tokens": str(count), "source": source,
                "seconds": f"{seconds:.1f}"}  # fmt: skip
        atomic_write_with(path, lambda tmp: save_file({"C": c.contiguous()}, str(tmp), metadata=meta))
        log.info("C of layer %d over %d tokens computed in %.1f s -> %s", layer, count, seconds, path)
        return c

    c, in_memory = cache.get_or_compute(f"cov:{path}", load_or_compute)
    return c.to(loaded.device), in_memory or from_disk


def covariance_path(loaded: LoadedModel, layer: int, hp: RomeHParams, cache: RomeCache) -> Path:
    """Where C of ``layer`` is cached: one file per (model, layer, text source, token count, length).

    Statistics derived from C (its eigenbasis, for instance) are cached beside it under this stem.
    """
    source = text_source_id(cache)
    name = f"cov-L{layer}-{source}-n{hp.mom2_n_tokens}-len{hp.mom2_seq_len}.safetensors"
    return cache.model_dir(loaded) / name


def text_source_id(cache: RomeCache) -> str:
    """``self`` (model-sampled text) or ``corpus-<name>-<content hash>``."""
    if cache.corpus is None:
        return "self"
    stem = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in cache.corpus.stem)[:40]
    return f"corpus-{stem}-{file_digest(cache.corpus)}"


def source_texts(
    loaded: LoadedModel, hp: RomeHParams, cache: RomeCache, *, progress: ProgressFn | None = None
) -> Iterable[str]:
    if cache.corpus is not None:
        return read_corpus(cache.corpus)
    return sample_texts(loaded, hp, cache, progress=progress)


def read_corpus(path: Path) -> Iterator[str]:
    """Texts of a .jsonl ("text" field per line) or a .txt (paragraphs split at blank lines)."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{i}: expected a JSON object with a 'text' field") from e
                if isinstance(text, str) and text.strip():
                    yield text
        return
    paragraph: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                paragraph.append(line.rstrip("\n"))
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def sample_texts(
    loaded: LoadedModel, hp: RomeHParams, cache: RomeCache, *, progress: ProgressFn | None = None
) -> list[str]:
    """About ``mom2_n_tokens`` tokens of text sampled from the model (cached as JSONL)."""
    path = cache.model_dir(loaded) / f"text-sample-n{hp.mom2_n_tokens}-len{hp.mom2_seq_len}.jsonl"

    def load_or_generate() -> list[str]:
        # Sampling is deterministic batch by batch, so a larger sample starts with a smaller one.
        existing = _larger_sample(path.parent, hp.mom2_n_tokens, hp.mom2_seq_len)
        if existing is not None:
            with open(existing, encoding="utf-8") as f:
                return [json.loads(line)["text"] for line in f if line.strip()]
        t0 = time.perf_counter()
        texts = generate_texts(loaded, hp.mom2_n_tokens, hp.mom2_seq_len, progress=progress)
        body = "".join(json.dumps({"text": t}) + "\n" for t in texts)
        atomic_write_with(path, lambda tmp: tmp.write_text(body, encoding="utf-8"))
        log.info("sampled %d texts from the model in %.1f s -> %s", len(texts), time.perf_counter() - t0, path)
        return texts

    texts, _ = cache.get_or_compute(f"texts:{path}", load_or_generate)
    return texts


def _larger_sample(folder: Path, n_tokens: int, seq_len: int) -> Path | None:
    """The smallest cached text sample of at least ``n_tokens`` tokens of ``seq_len``, if any."""
    best: tuple[int, Path] | None = None
    for p in folder.glob(f"text-sample-n*-len{seq_len}.jsonl"):
        try:
            n = int(p.name.split("-n", 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        if n >= n_tokens and (best is None or n < best[0]):
            best = (n, p)
    return None if best is None else best[1]


@torch.no_grad()
def generate_texts(
    loaded: LoadedModel, n_tokens: int, seq_len: int, *, seed: int = 0, progress: ProgressFn | None = None
) -> list[str]:
    """Sample texts of up to ``seq_len`` tokens until they hold ``n_tokens`` tokens."""
    tok, model = loaded.tokenizer, loaded.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    texts: list[str] = []
    count = 0
    devices = [loaded.device.index or 0] if loaded.device.type == "cuda" else []
    bar = tqdm(total=n_tokens, unit="tok", desc="sampling text for C", mininterval=2.0)
    batch_idx = 0
    while count < n_tokens:
        seeds = [TEXT_SEEDS[(batch_idx * GEN_BATCH + i) % len(TEXT_SEEDS)] for i in range(GEN_BATCH)]
        seeds = seeds[: max(1, -(-(n_tokens - count) // seq_len))]  # no more rows than the tokens still needed
        rows = [tok(s, add_special_tokens=True)["input_ids"] for s in seeds]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):  # left padding: generation continues every row at the right edge
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + batch_idx)
            out = model.generate(
                input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device), do_sample=True,
                temperature=SAMPLE_TEMPERATURE, top_p=1.0, top_k=0, max_new_tokens=max(1, seq_len - width),
                pad_token_id=pad,
            )  # fmt: skip
        new = out[:, width:]  # (B, T_new)
        for i in range(len(rows)):
            gen = new[i].tolist()
            eos_at = next((j for j, t in enumerate(gen) if t in _stop_ids(loaded)), len(gen))
            text = tok.decode(rows[i] + gen[:eos_at], skip_special_tokens=True)
            texts.append(text)
            # count the tokens as C will see them: decoding and re-encoding may merge a few
            count += min(len(tok(text, add_special_tokens=True)["input_ids"]), seq_len)
        bar.update(min(count, n_tokens) - bar.n)
        if progress is not None:
            progress("text_sample", min(count, n_tokens), n_tokens)
        batch_idx += 1
    bar.close()
    return texts


def _stop_ids(loaded: LoadedModel) -> set[int]:
    ids = {loaded.tokenizer.eos_token_id, loaded.tokenizer.pad_token_id}
    eos = loaded.model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}


@torch.inference_mode()
def second_moment(
    loaded: LoadedModel,
    layer: int,
    texts: Iterable[str],
    *,
    n_tokens: int,
    seq_len: int,
    batch_size: int,
    progress: ProgressFn | None = None,
    stop_early: bool = True,
) -> tuple[torch.Tensor, int]:
    """(C, tokens): C = sum_t k_t k_t^T / N over the first ``n_tokens`` non-pad tokens, float32 (D_in, D_in).

    The forward pass stops right after the edited projection (``stop_early=False``
    runs the whole model, as a baseline for the benchmarks).
    """
    spec, model, tok = loaded.spec, loaded.model, loaded.tokenizer
    name = spec.mlp_out_name(layer)
    d_in = spec.as_out_in(spec.mlp_out_weight(model, layer)).shape[1]
    total = torch.zeros(d_in, d_in, dtype=torch.float64, device=loaded.device)
    count = 0
    bar = tqdm(total=n_tokens, unit="tok", desc=f"C of layer {layer}", mininterval=2.0)
    for rows in _batches(_token_rows(tok, texts, seq_len), batch_size):
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        ids, mask = ids.to(loaded.device), mask.to(loaded.device)
        with Trace(model, [name], capture_input=True, capture_output=False) as tr:
            if stop_early:
                with stop_after(model, name):
                    run_until_stopped(model, input_ids=ids, attention_mask=mask)
            else:
                model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        keys = tr[name].input[mask.bool()].float()  # (N, D_in)
        keys = keys[: n_tokens - count]
        total += (keys.T @ keys).double()  # sum of k k^T over the batch
        count += keys.shape[0]
        bar.update(keys.shape[0])
        if progress is not None:
            progress("covariance", count, n_tokens)
        if count >= n_tokens:
            break
    bar.close()
    if count == 0:
        raise ValueError("the text source holds no tokens: C cannot be estimated")
    if count < n_tokens:
        log.warning("the text source ran out after %d of %d tokens: C is averaged over fewer", count, n_tokens)
    return (total / count).float(), count


def _token_rows(tokenizer: object, texts: Iterable[str], seq_len: int) -> Iterator[list[int]]:
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:seq_len]
        if len(ids) >= 2:
            yield ids


def _batches(rows: Iterable[list[int]], size: int) -> Iterator[list[list[int]]]:
    batch: list[list[int]] = []
    for r in rows:
        batch.append(r)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
