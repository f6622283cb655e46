"""Rebuild the shipped default tokenizer from the shipped corpus.

    python scripts/build_tokenizer.py            # writes keyeflow/model/assets/tokenizer/
    python scripts/build_tokenizer.py --out DIR  # writes elsewhere (the test compares such a build)

Training is deterministic: the same corpus gives byte-identical files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from keyeflow.model.tokenizer import (
    CORPUS_PATH,
    SHIPPED_TOKENIZER_DIR,
    VOCAB_SIZE,
    build_tokenizer,
    save_tokenizer,
    tokenizer_version,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=CORPUS_PATH)
    parser.add_argument("--out", type=Path, default=SHIPPED_TOKENIZER_DIR)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args(argv)

    tokenizer = build_tokenizer(args.corpus, args.vocab_size)
    files = save_tokenizer(tokenizer, args.out)
    print(f"vocab {len(tokenizer)}, version {tokenizer_version(tokenizer)}")
    for path in files:
        print(f"  {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
