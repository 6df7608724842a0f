"""Turn ``bench_generate.py`` JSON into the README's markdown tables and a PNG plot of tok/s against distinct adapters.

Several JSON files (e.g. one per process of a device call) are merged; a later file's row replaces an earlier one
for the same (mode, adapter dtype, batch, distinct adapters, loaded adapters, row). The tables:

1. end to end: tok/s of every row, and ours' ratios to base, to PEFT single and to PEFT mixed (compiled: PEFT's
   mixed batch is "not compiled"), with the correctness gate's verdict;
2. adapter dtype (where both were timed in one configuration): ours' ratio to base with the adapters in the
   model's dtype and in fp32 (PEFT's default), and the difference (the target is ≤ 0.03);
3. the correctness gate: error against the fp32 oracle, ours and PEFT's mixed batch;
4. decode-step profiles, where the JSON has them (``--profile``): per step GPU, host and LoRA time, prefill apart.

    python benchmarks/report_generate.py run1.json run2.json --table table.md --plot generate.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ANCHORS = ["base", "peft_disabled", "peft_single", "peft_mixed"]
TITLES = {"base": "base", "peft_disabled": "PEFT disabled¹", "peft_single": "PEFT single", "peft_mixed": "PEFT mixed"}


def load_results(paths: list[str]) -> tuple[dict, list[dict], list[dict]]:
    """The merged results and profiles of ``paths``, and the first file's ``meta`` (with its ``args``)."""
    merged: dict[tuple, dict] = {}
    profiles: dict[tuple, dict] = {}
    meta: dict = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        meta = meta or data["meta"] | {"args": data["args"]}
        loaded_default = max(data["args"].get("adapters") or [0])
        model_dtype = data["args"].get("model_dtype") or "bf16"
        for result in data["results"]:
            result = dict(result)
            result.setdefault("adapter_dtype", "model")
            result.setdefault("loaded_adapters", loaded_default)
            result["dtype_label"] = dtype_label(result, model_dtype)
            merged[_key(result)] = result
        for profile in data.get("profiles", []):
            profiles[(profile["mode"], profile["adapter_dtype"], profile["batch"], profile["row"])] = profile
    return meta, list(merged.values()), list(profiles.values())


def dtype_label(result: dict, model_dtype: str) -> str:
    torch_dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(result.get("adapter_torch_dtype"))
    if result["adapter_dtype"] == "fp32":
        return "fp32 (PEFT's default)"
    return f"{torch_dtype or model_dtype} (model's)"


def _key(result: dict) -> tuple:
    return (result["mode"], result["dtype_label"], result["batch"], result["distinct_adapters"],
            result["loaded_adapters"], result["row"])  # fmt: skip


def _config(result: dict) -> tuple:
    return _key(result)[:5]


def _config_order(config: tuple) -> tuple:
    mode, label, *rest = config
    return (["eager", "compiled"].index(mode), "fp32 (PEFT" in label, *rest)


def _row_order(row: str) -> tuple:
    return (ANCHORS.index(row) if row in ANCHORS else len(ANCHORS), row.endswith("_dora"), row)


def _row_title(row: str) -> str:
    if row in TITLES:
        return TITLES[row]
    backend = row.removeprefix("ours_").removesuffix("_dora")
    return f"ours ({backend}{', DoRA' if row.endswith('_dora') else ''})"


def _adapters(config: tuple) -> str:
    distinct, loaded = config[3], config[4]
    return str(distinct) if distinct == loaded else f"{distinct} ({loaded} loaded)"


def _ratio(result: dict | None, reference: dict | None, suffix: str = "") -> str:
    if result is None or reference is None or not result.get("tok_s") or not reference.get("tok_s"):
        return ""
    return f"{result['tok_s'] / reference['tok_s']:.3f}{suffix}"


def markdown_tables(meta: dict, results: list[dict], profiles: list[dict]) -> str:
    """The caption and every table, as markdown."""
    args = meta.get("args", {})
    layers = "/".join(str(count) for count in sorted({r["layers"] for r in results if "layers" in r}))
    caption = (
        f"{meta.get('device', '?')}, torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}, "
        f"transformers {meta.get('transformers', '?')}, peft {meta.get('peft', '?')}; "
        f"{layers} layers, prompt {args.get('prompt')}, {args.get('new_tokens')} new tokens, greedy, "
        f"median of {args.get('repeats')} interleaved repeats (PEFT mixed: {args.get('peft_mixed_repeats')}); "
        f"commit {meta.get('commit')}."
    )
    if any(r["row"] == "peft_disabled" for r in results):
        caption += " Base is the plain transformers model (no PEFT wrapper) with the same weights."
    parts = [caption, end_to_end_table(results), dtype_table(results), gate_table(results)]
    if profiles:
        parts.append(profile_table(profiles))
    return "\n\n".join(part for part in parts if part) + "\n"


def end_to_end_table(results: list[dict]) -> str:
    """One line per configuration: tok/s of every row, ours' ratios, the gate; errors as footnotes."""
    rows = sorted({r["row"] for r in results}, key=_row_order)
    ours = [row for row in rows if row.startswith("ours_")]
    timed = {r["row"] for r in results if r.get("tok_s")}
    plain = [row for row in ours if not row.endswith("_dora") and row in timed]
    dora = [row for row in ours if row.endswith("_dora")]
    configs = sorted({_config(r) for r in results}, key=_config_order)
    by_key = {_key(r): r for r in results}
    header = ["mode", "batch", "adapters", "adapter dtype", *(f"{_row_title(row)} tok/s" for row in rows)]
    for row in plain:
        header += [f"{_row_title(row)} / base", "/ PEFT single", "/ PEFT mixed"]
    header += [f"{_row_title(row)} / {_row_title(row.removesuffix('_dora'))}" for row in dora]
    header += ["gate"] if plain else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes: dict[str, int] = {}  # error text -> footnote number (¹ is the PEFT-disabled note)
    for config in configs:
        mode, label, batch = config[:3]
        cells = [mode, str(batch), _adapters(config), label]
        get = {row: by_key.get((*config, row)) for row in rows}
        for row in rows:
            result = get[row]
            if result is None:
                cells.append("not compiled" if row == "peft_mixed" and mode == "compiled" else "")
            elif result.get("error") and not result.get("tok_s"):
                note = notes.setdefault(f"{_row_title(row)}: {result['error']}", len(notes) + 2)
                cells.append(f"error{_sup(note)}")
            else:
                cells.append(f"{result['tok_s']:.0f}")
        for row in plain:
            result = get[row]
            cells.append(f"**{_ratio(result, get['base'])}**" if _ratio(result, get["base"]) else "")
            cells.append(_ratio(result, get.get("peft_single")))
            mixed = _ratio(result, get.get("peft_mixed"))
            cells.append(f"{float(mixed):.1f}×" if mixed else ("not compiled" if mode == "compiled" else ""))
        for row in dora:
            cells.append(_ratio(get[row], get.get(row.removesuffix("_dora"))))
        if plain:
            verdicts = [get[row].get("oracle_pass") for row in plain if get[row] is not None]
            verdicts = [verdict for verdict in verdicts if verdict is not None]
            cells.append("" if not verdicts else "pass" if all(verdicts) else "**FAIL**")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    footnotes = ["¹ the PeftModel under `disable_adapter()` (base in earlier runs); base is the plain transformers "
                 "model, sharing the same weights."] if "peft_disabled" in rows else []  # fmt: skip
    footnotes += [f"{_sup(number)} {note}" for note, number in notes.items()]
    return text + ("\n\n" + "\n".join(footnotes) if footnotes else "")


def _sup(number: int) -> str:
    return "".join("⁰¹²³⁴⁵⁶⁷⁸⁹"[int(digit)] for digit in str(number))


def dtype_table(results: list[dict]) -> str:
    """Ours' ratio to base with adapters in the model's dtype and in fp32, where one configuration has both."""
    by_key = {_key(r): r for r in results}
    lines = []
    seen = set()
    for result in sorted(results, key=lambda r: _config_order(_config(r))):
        if not result["row"].startswith("ours_") or result["adapter_dtype"] != "model" or not result.get("tok_s"):
            continue
        mode, label, batch, distinct, loaded, row = _key(result)
        fp32 = [r for key, r in by_key.items() if key[0] == mode and key[2:] == (batch, distinct, loaded, row)
                and r["adapter_dtype"] == "fp32" and r.get("tok_s")]  # fmt: skip
        if not fp32 or (mode, batch, distinct, loaded, row) in seen:
            continue
        seen.add((mode, batch, distinct, loaded, row))
        other = fp32[0]
        base, base32 = (by_key.get((mode, r["dtype_label"], batch, distinct, loaded, "base")) for r in (result, other))
        single, single32 = (
            by_key.get((mode, r["dtype_label"], batch, distinct, loaded, "peft_single")) for r in (result, other)
        )
        ratio, ratio32 = _ratio(result, base), _ratio(other, base32)
        gap = f"{float(ratio32) - float(ratio):+.3f}" if ratio and ratio32 else ""
        lines.append(
            f"| {mode} | {batch} | {_adapters(_config(result))} | {_row_title(row)} | {ratio} | {ratio32} | {gap} | "
            f"{_ratio(single, base)} | {_ratio(single32, base32)} | {_ratio(result, single)} | "
            f"{_ratio(other, single32)} |"
        )
    if not lines:
        return ""
    header = (
        "| mode | batch | adapters | row | ours / base, model-dtype adapters | ours / base, fp32 adapters | "
        "fp32 − model (target: within ±0.03) | PEFT single / base, model dtype | PEFT single / base, fp32 | "
        "ours / PEFT single, model dtype | ours / PEFT single, fp32 |"
    )
    return "\n".join([header, "|" + "---|" * 11, *lines])


def gate_table(results: list[dict]) -> str:
    """Teacher-forced logits against the fp32 oracle: ours and PEFT's mixed batch in the same adapter dtype."""
    lines, nan = [], float("nan")
    for result in sorted(results, key=lambda r: (_config_order(_config(r)), _row_order(r["row"]))):
        if "oracle_rel_logit_error" not in result or not result["row"].startswith("ours_"):
            continue
        lines.append(
            f"| {result['mode']} | {result['batch']} | {_adapters(_config(result))} | {result['dtype_label']} | "
            f"{_row_title(result['row'])} | {result['oracle_rel_logit_error']:.4f} | "
            f"{result['oracle_argmax_agreement']:.3f} | {result.get('oracle_peft_rel_logit_error', nan):.4f} | "
            f"{result.get('oracle_peft_argmax_agreement', nan):.3f} | "
            f"{'pass' if result.get('oracle_pass') else '**FAIL**'} |"
        )
    if not lines:
        return ""
    header = (
        "| mode | batch | adapters | adapter dtype | row | rel. logit error vs fp32 | argmax agreement | "
        "PEFT mixed error | PEFT mixed agreement | gate (≤ 1.1× PEFT's error, ≥ PEFT's agreement − 0.01) |"
    )
    return "\n".join([header, "|" + "---|" * 10, *lines])


PROFILE_COLUMNS = [
    ("step_ms", "step ms", ".2f"), ("gpu_ms", "GPU ms", ".2f"), ("host_ms", "host ms", ".2f"),
    ("lora_gpu_ms", "LoRA kernels GPU ms", ".3f"), ("launches", "GPU ops", ".0f"),
    ("lookup_ms", "dynamo lookup ms", ".2f"), ("context_enter_ms", "per-call context ms", ".2f"),
    ("prefill_ms", "prefill ms", ".1f"), ("prefill_gpu_ms", "prefill GPU ms", ".1f"),
    ("prefill_lora_gpu_ms", "prefill LoRA GPU ms", ".2f"),
]  # fmt: skip


def profile_table(profiles: list[dict]) -> str:
    """Per decode step (host = step − GPU), then the prefill (the one-token generate); × base is the step's."""
    header = ["mode", "batch", "adapters", "adapter dtype", "row", *(title for _, title, _ in PROFILE_COLUMNS)]
    header.append("step × base")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def order(profile: dict) -> tuple:
        dtype = profile["adapter_dtype"]
        return (["eager", "compiled"].index(profile["mode"]), profile["batch"], dtype != "none", dtype == "fp32",
                _row_order(profile["row"]))  # fmt: skip

    ordered = sorted(profiles, key=order)
    for profile in ordered:
        base = next((p for p in profiles if (p["mode"], p["batch"], p["row"]) == (profile["mode"], profile["batch"],
                                                                                    "base")), None)  # fmt: skip
        cells = [profile["mode"], str(profile["batch"]), str(profile["distinct_adapters"]), profile["adapter_dtype"],
                 _row_title(profile["row"])]  # fmt: skip
        cells += ["" if profile.get(key) is None else format(profile[key], spec) for key, _, spec in PROFILE_COLUMNS]
        cells.append(f"{base['step_ms'] / profile['step_ms']:.2f}" if base and profile.get("step_ms") else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    """tok/s against distinct adapters: one panel per (mode, adapter dtype), one line per (row, batch), log axes."""
    import matplotlib

    matplotlib.use("Agg")  # no display on the machines this runs on
    import matplotlib.pyplot as plt

    timed = [r for r in results if r.get("tok_s")]
    panels = sorted({(r["mode"], r["dtype_label"]) for r in timed}, key=lambda p: _config_order((*p, 0, 0, 0)))
    rows = sorted({r["row"] for r in timed}, key=_row_order)
    colors = {row: f"C{index}" for index, row in enumerate(rows)}
    batches = sorted({r["batch"] for r in timed}, key=lambda b: -sum(r["batch"] == b for r in timed))
    styles = ["-", "--", ":", "-."]
    columns = min(2, len(panels))
    lines = -(-len(panels) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(6.4 * columns, 4.6 * lines), squeeze=False)
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    for axis, (mode, label) in zip(axes.flat, panels, strict=False):
        mine = [r for r in timed if (r["mode"], r["dtype_label"]) == (mode, label)]
        counts = sorted({r["distinct_adapters"] for r in mine})
        most_loaded = max(r["loaded_adapters"] for r in mine)
        for row in rows:
            for batch in batches:
                for loaded in sorted({r["loaded_adapters"] for r in mine}):
                    points = sorted(
                        (r["distinct_adapters"], r["tok_s"])
                        for r in mine
                        if (r["row"], r["batch"], r["loaded_adapters"]) == (row, batch, loaded)
                    )
                    if not points:
                        continue
                    name = f"{_row_title(row)}, batch {batch}" + (
                        "" if loaded == most_loaded else f", {loaded} loaded"
                    )
                    axis.plot(*zip(*points, strict=True), styles[batches.index(batch) % 4], marker="o",
                              color=colors[row], label=name, alpha=1.0 if loaded == most_loaded else 0.5)  # fmt: skip
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(counts, [str(count) for count in counts])
        axis.set(title=f"{mode}, adapters {label}", xlabel="distinct adapters in the batch", ylabel="tok/s")
        if mode == "compiled" and "peft_mixed" in rows:
            axis.text(0.02, 0.02, "PEFT mixed: not compiled", transform=axis.transAxes, fontsize="small")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="x-small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="bench_generate.py JSON files")
    parser.add_argument("--table", default="generate.md")
    parser.add_argument("--plot", default="generate.png")
    args = parser.parse_args()
    meta, results, profiles = load_results(args.inputs)
    table = markdown_tables(meta, results, profiles)
    Path(args.table).write_text(table)
    try:
        plot(results, args.plot)
    except ImportError as error:  # the table is the result; the plot needs matplotlib
        print(f"no plot: {error}")
    print(table)


if __name__ == "__main__":
    main()
