"""The demo model's corpus: the King James Bible from Debian's `bible-kjv` package (public domain),
as plain prose, one chapter a line, split into train and validation chapters.

    python -m openelm_mlx.apps.corpus work-tmp/kjv     # writes train.txt and validation.txt
"""

import argparse
import re
import shutil
import subprocess
from pathlib import Path
from typing import List, Tuple

from openelm_mlx.errors import OpenELMError
from openelm_mlx.units import size_text

VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")  # "1Sm3:4 And the LORD called ..."
WHOLE_BIBLE = "Gen1:1-Rev22:21"
# Every 40th chapter is held out (30 of 1189, spread over the whole book): never trained on.
VALIDATION_EVERY = 40


def kjv_chapters() -> List[str]:
    """Every chapter of the KJV as one line of prose, verse references stripped."""
    if shutil.which("bible") is None:
        raise OpenELMError("the `bible` program is missing: apt-get install bible-kjv (Debian/Ubuntu)")
    out = subprocess.run(["bible", "-f", WHOLE_BIBLE], capture_output=True, text=True, check=False)
    if out.returncode != 0 or not out.stdout:
        raise OpenELMError(f"`bible -f {WHOLE_BIBLE}` failed ({out.stderr.strip()}): reinstall bible-kjv")
    chapters, current, key = [], [], None
    for line in out.stdout.splitlines():
        match = VERSE.match(line)
        if match is None:
            raise OpenELMError(f"unexpected line from `bible`: {line[:60]!r}")
        book, chapter, _, text = match.groups()
        if (book, chapter) != key and current:
            chapters.append(" ".join(current))
            current = []
        key = (book, chapter)
        current.append(text.strip())
    chapters.append(" ".join(current))
    return chapters


def split(chapters: List[str]) -> Tuple[List[str], List[str]]:
    """(train, validation): chapter i goes to validation when i % VALIDATION_EVERY == VALIDATION_EVERY - 1."""
    held_out = [i % VALIDATION_EVERY == VALIDATION_EVERY - 1 for i in range(len(chapters))]
    train = [c for c, out in zip(chapters, held_out) if not out]
    validation = [c for c, out in zip(chapters, held_out) if out]
    return train, validation


def write_corpus(output: Path, force: bool = False) -> Tuple[Path, Path]:
    output = Path(output)
    paths = output / "train.txt", output / "validation.txt"
    if not force and any(p.exists() for p in paths):
        raise OpenELMError(f"{output} already holds train.txt/validation.txt: pass --force to overwrite")
    output.mkdir(parents=True, exist_ok=True)
    for path, chapters in zip(paths, split(kjv_chapters())):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(chapters) + "\n")
        tmp.rename(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="folder for train.txt and validation.txt")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    try:
        for path in write_corpus(args.output, args.force):
            print(f"{path}: {size_text(path.stat().st_size)}")
    except OpenELMError as e:
        parser.exit(1, f"corpus: error: {e}\n")


if __name__ == "__main__":
    main()
