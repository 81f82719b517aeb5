"""lambda/README.md's table of the API's error codes and limits, generated from
sagemaker_code/api_contract.json (the one table the API function and the model both read).

  python -m scripts.api_contract_table           # print the table
  python -m scripts.api_contract_table --write   # rewrite it in lambda/README.md
  python -m scripts.api_contract_table --check   # exit 1 when lambda/README.md's is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT / "sagemaker_code" / "api_contract.json"
README = ROOT / "lambda" / "README.md"
BEGIN = "<!-- generated from sagemaker_code/api_contract.json by scripts/api_contract_table.py: do not edit -->"
END = "<!-- end of the generated table -->"
FOUND_BY = {("api",): "function", ("model",): "model", ("api", "model"): "function or model"}
LIMIT_NAMES = {
    "max_request_bytes": "request body, bytes",
    "max_image_bytes": "one image, bytes",
    "max_images": "images per request",
    "max_pixels": "pixels per image (width x height)",
}


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def render(contract: dict | None = None) -> str:
    contract = contract or json.loads(CONTRACT.read_text())
    lines = ["| limit | value |", "| --- | --- |"]
    lines += [f"| {LIMIT_NAMES.get(name, name)} | {value:,} |" for name, value in contract["limits"].items()]
    for kind, limits in contract.get("limits_by_endpoint", {}).items():
        if not kind.startswith("/"):
            lines += [f"| {LIMIT_NAMES.get(n, n)}, {kind} endpoint | {v:,} |" for n, v in limits.items()]
    lines += [
        "",
        "| status | `error` | found by | `message` (where a layer knows more: which image, and what) |",
        "| --- | --- | --- | --- |",
    ]
    for code, entry in sorted(contract["errors"].items(), key=lambda item: item[1]["status"]):
        found_by = FOUND_BY[tuple(sorted(entry["checked_by"]))]
        lines.append(f"| {entry['status']} | `{code}` | {found_by} | {cell(entry['message'])} |")
    return "\n".join(lines)


def replaced(readme: str, table: str) -> str:
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--write", action="store_true", help="rewrite the table in lambda/README.md")
    what.add_argument("--check", action="store_true", help="exit 1 when lambda/README.md's table is out of date")
    args = parser.parse_args(argv)
    table = render()
    readme = README.read_text()
    if args.check:
        if replaced(readme, table) != readme:
            print(f"{README} is out of date: run python -m scripts.api_contract_table --write", file=sys.stderr)
            return 1
        return 0
    if args.write:
        README.write_text(replaced(readme, table))
        return 0
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
