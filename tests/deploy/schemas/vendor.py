"""Write one CRD's openAPIV3Schema as the JSON file tests/deploy/test_manifests.py validates with.

    python tests/deploy/schemas/vendor.py CRD.yaml VERSION OUT.json --source REPO@COMMIT:PATH \
        [--drop spec.transformer --drop status ...]

The schema is kept as the CRD states it, less its descriptions (documentation only) and the
subtrees named by --drop (what the manifests here never use: their absence makes the strict
validation in the tests refuse those fields). The file records where it came from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml


def _without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_without_descriptions(v) for v in node]
    return node


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("crd", type=Path)
    ap.add_argument("version")
    ap.add_argument("out", type=Path)
    ap.add_argument("--source", required=True, help="repository@commit:path of the CRD")
    ap.add_argument("--license", default="Apache-2.0 (LICENSE-APACHE-2.0 beside this file)")
    ap.add_argument("--drop", action="append", default=[], help="a dotted path of properties to leave out")
    args = ap.parse_args()

    crd = next(d for d in yaml.safe_load_all(args.crd.read_text()) if d and d.get("kind") == "CustomResourceDefinition")
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == args.version]
    schema = _without_descriptions(version["schema"]["openAPIV3Schema"])
    for dotted in args.drop:
        node = schema
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node["properties"][part]
        del node["properties"][leaf]
        if leaf in node.get("required", []):
            node["required"].remove(leaf)
    doc = {
        "source": args.source,
        "crd": crd["metadata"]["name"],
        "version": args.version,
        "license": args.license,
        "changes": "descriptions removed" + (f"; left out: {', '.join(args.drop)}" if args.drop else ""),
        "openAPIV3Schema": schema,
    }
    args.out.write_text(json.dumps(doc, separators=(",", ":"), sort_keys=False) + "\n")
    print(f"{args.out}: {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
