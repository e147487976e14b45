"""Fill the result tables of docs/results.md from runs/accuracy/*.json (the <!-- X_TABLE --> markers)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402

DOC = accuracy.REPO / "docs" / "results.md"
EXPECTED = {"lite0": ["1 linear probe", "2 last layer", "3 Gather* k=1", "3 Gather* k=1 mean", "4 Gather* k=2",
                      "4 Gather* k=3", "5 all layers (k=4)"],
            "vit": ["1 linear probe", "2 last layer", "3 Gather* k=1", "3 Gather* k=1 mean", "4 Gather* k=2",
                    "4 Gather* k=3", "5 all layers (k=7)"]}
EXPECTED["lite0_full"] = EXPECTED["lite0"]
EXPECTED["vit12"] = EXPECTED["vit"][:-1] + ["5 all layers (k=13)"]
TABLES = (("lite0", "LITE0_TABLE"), ("vit", "VIT_TABLE"), ("vit12", "VIT12_TABLE"), ("lite0_full", "LITE0_FULL_TABLE"))


def main() -> None:
    import json

    text = DOC.read_text()
    for name, tag in TABLES:
        if not (accuracy.OUT / f"{name}.json").is_file():
            continue
        done = {r["row"] for r in json.loads((accuracy.OUT / f"{name}.json").read_text())["rows"]}
        missing = [r[2:] for r in EXPECTED[name] if r not in done]
        body = accuracy.table(name)
        if missing:
            body += "\n\nNot run (out of time): " + ", ".join(missing) + "."
        block = f"<!-- {tag} -->\n{body}\n<!-- /{tag} -->"
        text = re.sub(rf"<!-- {tag} -->.*?<!-- /{tag} -->|<!-- {tag} -->", lambda m, b=block: b, text, flags=re.S)
    DOC.write_text(text)


if __name__ == "__main__":
    main()
