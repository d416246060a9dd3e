"""Quote the demo's numbers in the README: replace every ``<!-- demo:NAME -->`` ...
``<!-- /demo:NAME -->`` block of README.md with the block of the same name in docs/demo.md
(written by ``fxgndi demo``). ``make demo`` runs it after the demo, so the README's demo tables
are always the last run's; ``tests/app/test_demo_record.py`` checks that they are.

    python scripts/quote_demo.py docs/demo.md README.md
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

BLOCK = re.compile(r"<!-- demo:(?P<name>[\w-]+) -->\n.*?\n<!-- /demo:(?P=name) -->", re.S)


def blocks(text: str) -> dict[str, str]:
    """Each named block of ``text``, markers included."""
    return {m.group("name"): m.group(0) for m in BLOCK.finditer(text)}


def quote(record: str, readme: str) -> str:
    """``readme`` with each of its blocks replaced by ``record``'s block of that name."""
    source = blocks(record)
    missing = sorted(set(blocks(readme)) - set(source))
    if missing:
        raise SystemExit(f"quote_demo: README block(s) {', '.join(missing)} are not in the "
                         f"demo's record (its blocks: {', '.join(source)})")
    return BLOCK.sub(lambda m: source[m.group("name")], readme)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit("usage: python scripts/quote_demo.py docs/demo.md README.md")
    record_path, readme_path = argv
    with open(record_path) as f:
        record = f.read()
    with open(readme_path) as f:
        readme = f.read()
    updated = quote(record, readme)
    if updated != readme:  # written atomically: a failure leaves the README as it was
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(readme_path)))
        with os.fdopen(fd, "w") as f:
            f.write(updated)
        os.chmod(tmp, os.stat(readme_path).st_mode)
        os.replace(tmp, readme_path)
    print(f"quote_demo: {len(blocks(readme))} block(s) of {readme_path} now quote "
          f"{record_path}" + ("" if updated != readme else " (unchanged)"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
