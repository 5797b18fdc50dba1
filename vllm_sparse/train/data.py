# SPDX-License-Identifier: Apache-2.0
"""Training text for gate distillation, kept apart from what the benchmarks evaluate on.

Default source: Debian's `python3.11-doc` (the reStructuredText sources of the CPython
3.11 documentation), fetched with `apt-get download` into `.cache/python3.11-doc/` and
unpacked with `dpkg-deb -x`. The benchmarks evaluate on `pydoc_data.topics`, which is
generated from parts of these same docs (the language reference, stdtypes, ...), so every
file sharing word 13-grams with it beyond `MAX_OVERLAP` is dropped (decontamination in the
style of the GPT-3 paper); the benchmarks' synthetic tasks are never used. `--data PATH`
(a text file or a directory of .txt/.rst/.md/.html files) replaces the default source and
gets the same filter.
"""

import hashlib
import random
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_sparse.models import CACHE_DIR

DEBIAN_PACKAGE = "python3.11-doc"
SOURCES = "usr/share/doc/python3.11/html/_sources"
SUFFIXES = (".txt", ".rst", ".md", ".html", ".htm")
NGRAM, MAX_OVERLAP = 13, 0.01


@dataclass
class Corpus:
    """texts: the kept documents; description: source, file counts, what was dropped."""

    texts: list[str]
    description: str


def debian_python_docs(cache_dir: Path = CACHE_DIR) -> Path:
    """The `_sources` directory of python3.11-doc, downloaded and unpacked on first use."""
    root = Path(cache_dir) / DEBIAN_PACKAGE
    sources = root / "root" / SOURCES
    if sources.is_dir():
        return sources
    root.mkdir(parents=True, exist_ok=True)
    debs = sorted(root.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    try:
        if not debs:
            subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=root, check=True,
                           capture_output=True, text=True)
            debs = sorted(root.glob(f"{DEBIAN_PACKAGE}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root / "root")], check=True,
                       capture_output=True, text=True)
    except (OSError, IndexError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        raise RuntimeError(
            f"could not obtain Debian's {DEBIAN_PACKAGE} into {root} ({detail}). Run "
            f"`apt-get update && cd {root} && apt-get download {DEBIAN_PACKAGE}`, or pass "
            "--data PATH (a text file or directory) instead") from None
    return sources


def _strip_markup(text: str) -> str:
    text = re.sub(r"<[^>]+>", " ", text) if "</" in text else text
    text = re.sub(r":[\w.:+-]+:`~?([^`<]*?)(?:\s*<[^`]*>)?`", r"\1", text)  # :func:`x` -> x
    return re.sub(r"\n{3,}", "\n\n", text)


def read_texts(path: Path) -> list[tuple[str, str]]:
    """A file, or every SUFFIXES file under a directory (sorted) -> [(name, text)]."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    else:
        raise FileNotFoundError(f"--data {path}: no such file or directory")
    if not files:
        raise ValueError(f"--data {path}: no files ending in {', '.join(SUFFIXES)}")
    return [(str(f.relative_to(path) if f != path else f.name),
             _strip_markup(f.read_text(errors="replace"))) for f in files]


def _ngrams(text: str, n: int = NGRAM) -> set[int]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {hash(" ".join(words[i:i + n])) for i in range(len(words) - n + 1)}


def evaluation_ngrams() -> set[int]:
    """Word 13-grams of the benchmarks' evaluation text (`pydoc_data.topics`)."""
    from vllm_sparse.models import long_text

    return _ngrams(long_text())


def decontaminate(docs: list[tuple[str, str]], banned: set[int]) -> tuple[list, list]:
    """-> (kept docs, dropped names): a doc is dropped when more than MAX_OVERLAP of its
    13-grams occur in `banned`."""
    kept, dropped = [], []
    for name, text in docs:
        grams = _ngrams(text)
        overlap = len(grams & banned) / max(1, len(grams))
        if overlap > MAX_OVERLAP:
            dropped.append(name)
        else:
            kept.append(text)
    return kept, dropped


def load_corpus(path: str | Path | None = None, cache_dir: Path = CACHE_DIR) -> Corpus:
    """Decontaminated training documents from `path`, or from python3.11-doc if None."""
    source = Path(path) if path else debian_python_docs(cache_dir)
    label = str(source) if path else f"debian:{DEBIAN_PACKAGE} ({source})"
    docs = read_texts(source)
    texts, dropped = decontaminate(docs, evaluation_ngrams())
    if not texts:
        raise ValueError(f"{label}: all {len(docs)} files overlap the evaluation text")
    return Corpus(texts, f"{label}: {len(texts)} of {len(docs)} files; dropped {len(dropped)} "
                         f"with >{MAX_OVERLAP:.0%} word-13-gram overlap with pydoc_data.topics")


def tokenize(corpus: Corpus, tokenizer, cache_dir: Path = CACHE_DIR) -> torch.Tensor:
    """All documents, EOS-separated -> ids [T] int64 (cached under cache_dir/train-data)."""
    key = hashlib.sha1("\0".join([tokenizer.name_or_path, str(len(tokenizer)), *corpus.texts])
                       .encode()).hexdigest()[:16]
    cached = Path(cache_dir) / "train-data" / f"{key}.pt"
    if cached.exists():
        return torch.load(cached)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = []
    for ids_doc in tokenizer(corpus.texts, add_special_tokens=False)["input_ids"]:
        ids.extend(ids_doc + eos)
    out = torch.tensor(ids, dtype=torch.long)
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cached)
    return out


class TokenWindows:
    """Non-overlapping seq_len windows of a token stream, in a seeded random order.

    windows(step) -> input_ids [1, seq_len]; step s and s + len(windows) give the same
    window, so a run of any length, resumed or not, sees a deterministic sequence.
    """

    def __init__(self, ids: torch.Tensor, seq_len: int, seed: int = 0):
        if len(ids) < seq_len:
            raise ValueError(f"training text has {len(ids)} tokens, fewer than "
                             f"--seq-len {seq_len}")
        self.ids, self.seq_len = ids, seq_len
        self.order = list(range(len(ids) // seq_len))
        random.Random(seed).shuffle(self.order)

    def __len__(self) -> int:
        return len(self.order)

    def __call__(self, step: int) -> torch.Tensor:
        start = self.order[step % len(self.order)] * self.seq_len
        return self.ids[start:start + self.seq_len][None]
