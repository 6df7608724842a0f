"""Turn ``bench_generate.py`` JSON into the README's markdown table and a PNG plot of tok/s against distinct adapters.

Several JSON files (e.g. one per device call, each within its time limit) are merged; a later file's row replaces an
earlier one for the same (mode, batch, distinct adapters, row).

    python benchmarks/report_generate.py run1.json run2.json --table table.md --plot generate.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_results(paths: list[str]) -> tuple[dict, list[dict]]:
    """The merged results of ``paths`` and the first file's ``meta``."""
    merged: dict[tuple, dict] = {}
    meta: dict = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        meta = meta or data["meta"] | {"args": data["args"]}
        for result in data["results"]:
            # Runs of both adapter dtypes are kept apart: the mode reads "eager, fp32 adapters" for PEFT's default.
            result = dict(result)
            if result.get("adapter_dtype", "model") != "model":
                result["mode"] = f"{result['mode']}, {result['adapter_dtype']} adapters"
            merged[(result["mode"], result["batch"], result["distinct_adapters"], result["row"])] = result
    return meta, list(merged.values())


def markdown_table(meta: dict, results: list[dict]) -> str:
    """One line per (mode, batch, distinct adapters): tok/s of each row, ours' ratio to base and to PEFT mixed."""
    rows = sorted({result["row"] for result in results}, key=_row_order)
    configs = sorted({(r["mode"], r["batch"], r["distinct_adapters"]) for r in results}, key=_config_order)
    by_key = {(r["mode"], r["batch"], r["distinct_adapters"], r["row"]): r for r in results}
    ours = [row for row in rows if row.startswith("ours_")]
    plain = [row for row in ours if not row.endswith("_dora")]
    dora = [row for row in ours if row.endswith("_dora")]
    header = ["mode", "batch", "adapters", *(f"{row} tok/s" for row in rows)]
    header += [f"{row} / base" for row in ours] + [f"{row} / PEFT mixed" for row in plain]
    header += [f"{row} / {row.removesuffix('_dora')}" for row in dora]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for config in configs:
        cells = [str(value) for value in config]
        cells += [_tok_s(by_key.get((*config, row))) for row in rows]
        for row in ours:
            result = by_key.get((*config, row))
            cells.append("" if result is None else f"{result['ratio_to_base']:.3f}")
        for row in plain:
            cells.append(_speedup(by_key.get((*config, row)), by_key.get((*config, "peft_mixed"))))
        for row in dora:  # the cost of DoRA against plain LoRA in the same batch shape
            cells.append(_speedup(by_key.get((*config, row)), by_key.get((*config, row.removesuffix("_dora")))))
        lines.append("| " + " | ".join(cells) + " |")
    args = meta.get("args", {})
    caption = (
        f"{meta.get('device', '?')}, torch {meta.get('torch', '?')}; prompt {args.get('prompt')}, "
        f"{args.get('new_tokens')} new tokens, greedy, median of {args.get('repeats')} interleaved repeats "
        f"(PEFT mixed: {args.get('peft_mixed_repeats')})."
    )
    return caption + "\n\n" + "\n".join(lines) + "\n"


def plot(results: list[dict], path: str) -> None:
    """tok/s against distinct adapters: one panel per (mode, batch), a group of bars per adapter count, one bar per
    row (bars rather than lines, so that a run of one adapter count still reads)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on the machines this runs on
    import matplotlib.pyplot as plt

    panels = sorted({(r["mode"], r["batch"]) for r in results}, key=_config_order)
    rows = sorted({r["row"] for r in results}, key=_row_order)
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for axis, (mode, batch) in zip(axes[0], panels, strict=True):
        counts = sorted({r["distinct_adapters"] for r in results if (r["mode"], r["batch"]) == (mode, batch)})
        width = 0.8 / len(rows)
        for index, row in enumerate(rows):
            by_count = {
                r["distinct_adapters"]: r["tok_s"]
                for r in results
                if (r["mode"], r["batch"], r["row"]) == (mode, batch, row)
            }
            positions = [slot + (index - (len(rows) - 1) / 2) * width for slot in range(len(counts))]
            axis.bar(positions, [by_count.get(count, 0) for count in counts], width, label=row)
        axis.set_xticks(range(len(counts)), [str(count) for count in counts])
        axis.set(title=f"{mode}, batch {batch}", xlabel="distinct adapters", ylabel="tok/s")
        axis.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _speedup(result: dict | None, reference: dict | None) -> str:
    return "" if result is None or reference is None else f"{result['tok_s'] / reference['tok_s']:.2f}×"


def _tok_s(result: dict | None) -> str:
    return "" if result is None else f"{result['tok_s']:.0f}"


def _row_order(row: str) -> tuple:
    return (["base", "peft_single", "peft_mixed"].index(row) if not row.startswith("ours_") else 3, row)


def _config_order(config: tuple) -> tuple:
    mode, _, dtype = config[0].partition(", ")
    return (["eager", "compiled"].index(mode), dtype, *config[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="bench_generate.py JSON files")
    parser.add_argument("--table", default="generate.md")
    parser.add_argument("--plot", default="generate.png")
    args = parser.parse_args()
    meta, results = load_results(args.inputs)
    table = markdown_table(meta, results)
    Path(args.table).write_text(table)
    plot(results, args.plot)
    print(table)


if __name__ == "__main__":
    main()
