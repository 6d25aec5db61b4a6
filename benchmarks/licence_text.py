"""Write a user-style calibration text for ``--calib-text``: the distinct licence texts of the installed
Python packages (English legal prose: neither news like PTB nor Python documentation like pydoc,
so it is a third domain, and no evaluated corpus is in it).

    python benchmarks/licence_text.py [--out out/calib/licences.txt]

Files named LICENSE*, LICENCE*, COPYING*, NOTICE* or AUTHORS* inside ``*.dist-info`` folders of the
environment's site-packages, in sorted path order, each kept once (texts equal up to whitespace are
duplicates), joined by blank lines. The result depends on the installed packages, so the script
prints the file's size, SHA-256 and token count (SmolLM2's tokenizer) for the record.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import site
import sys
from pathlib import Path

NAME = re.compile(r"(LICEN[CS]E|COPYING|NOTICE|AUTHORS)", re.IGNORECASE)


def licence_texts(roots: list[Path]) -> list[str]:
    """Distinct licence texts under ``roots``' ``*.dist-info`` folders, in sorted path order."""
    seen: set[str] = set()
    texts = []
    for path in sorted(p for root in roots for p in root.glob("*.dist-info/**/*")
                       if p.is_file() and NAME.match(p.name)):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        key = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
        if text and key not in seen:
            seen.add(key)
            texts.append(text)
    return texts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/calib/licences.txt")
    args = ap.parse_args()
    roots = [Path(p) for p in site.getsitepackages()]
    texts = licence_texts(roots)
    if not texts:
        raise SystemExit(f"no licence files under {roots}; pass another --calib-text")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = "\n\n".join(texts) + "\n"
    out.write_text(body, encoding="utf-8")
    from transformers import AutoTokenizer

    from thawed.runtime.demo_model import demo_model_dir

    n = len(AutoTokenizer.from_pretrained(demo_model_dir())(body, add_special_tokens=False)["input_ids"])
    print(f"{out}: {len(texts)} licence texts, {len(body.encode())} bytes, {n} tokens, "
          f"sha256 {hashlib.sha256(body.encode()).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
