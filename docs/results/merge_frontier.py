"""Merge frontier sweeps run in parallel into one file. Run from the repository root:
``python docs/results/merge_frontier.py OUT.json PART.json [PART.json ...]``.

Each part ran ``tools/frontier.py --families ...`` on its own ``--out`` after its reference
(the uncached clips, JSON and ``.reference.pt``) was copied from the first part, so every part
holds the same meta and reference; that is checked. The points are written family by family in the
order of ``default_sweep`` (others after them), with the PNG and the table, through the atomic
writers."""
import json
import sys

from opensora_duca.eval.frontier import default_sweep, format_table, plot, point_key
from opensora_duca.utils.atomic import write_json


def main(out, parts):
    loaded = []
    for path in parts:
        with open(path, encoding="utf-8") as f:
            loaded.append(json.load(f))
    first = loaded[0]
    for path, part in zip(parts[1:], loaded[1:]):
        for key in ("meta", "reference"):
            if part[key] != first[key]:
                sys.exit(f"merge_frontier: {path} has another {key} than {parts[0]}")
    points = {point_key(p["config"]): p for part in loaded for p in part["points"]}
    families = list(dict.fromkeys(f for f, _ in default_sweep()))
    ranked = sorted(points.values(), key=lambda p: families.index(p["family"])
                    if p["family"] in families else len(families))  # stable: parts' order
    merged = dict(first, points=ranked)
    write_json(out, merged)
    plot(merged, out[:-len(".json")] + ".png" if out.endswith(".json") else out + ".png")
    print(format_table(merged))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__.splitlines()[1])
    main(sys.argv[1], sys.argv[2:])
