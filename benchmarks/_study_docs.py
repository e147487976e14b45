"""Fill the result tables of docs/results.md from runs/accuracy/*.json (the <!-- X_TABLE --> markers)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402
import accuracy_plots  # noqa: E402

DOC = accuracy.REPO / "docs" / "results.md"
ROWS = ["1 linear probe", "2 last layer", "2 last layer, {n} blocks", "3 Gather* k=1", "3 Gather* k=1 mean",
        "3 Gather* k=1 mean, {n} blocks", "4 Gather* k=2", "4 Gather* k=3", "5 all layers (k={n})"]
EXPECTED = {name: [r.format(n=n) for r in ROWS] for name, n in (("lite0", 4), ("lite0_full", 4), ("vit", 7),
                                                                 ("vit12", 13))}
TABLES = (("lite0", "LITE0_TABLE"), ("vit", "VIT_TABLE"), ("vit12", "VIT12_TABLE"), ("lite0_full", "LITE0_FULL_TABLE"))


def main() -> None:
    import json

    text = DOC.read_text()
    for name, tag in TABLES:
        if not (accuracy.OUT / f"{name}.json").is_file():
            continue
        done = {r["row"] for r in json.loads((accuracy.OUT / f"{name}.json").read_text())["rows"]}
        missing = [r[2:] for r in EXPECTED[name] if r not in done]
        body = accuracy_plots.table(name)
        if missing:
            body += "\n\nNot run (out of time): " + ", ".join(missing) + "."
        block = f"<!-- {tag} -->\n{body}\n<!-- /{tag} -->"
        text = re.sub(rf"<!-- {tag} -->.*?<!-- /{tag} -->|<!-- {tag} -->", lambda m, b=block: b, text, flags=re.S)
    DOC.write_text(text)


if __name__ == "__main__":
    main()
