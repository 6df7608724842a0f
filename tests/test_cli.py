"""The demo and the example script, run as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_fastlora import tiny
from peft_fastlora.__main__ import build_parser

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    completed = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def run_failing(*args: str) -> str:
    """Run a command that must refuse a user mistake: exit status 2 and one line of error, no traceback. Returns
    that line. TRITON_INTERPRET is dropped from the environment, as on a user's CPU machine."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    completed = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert completed.returncode == 2, (completed.returncode, completed.stderr)
    assert "Traceback" not in completed.stderr, completed.stderr
    lines = [line for line in completed.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, completed.stderr
    return lines[0]


def test_demo_matches_peft():
    output = run("-m", "peft_fastlora", "demo", "--backend", "torch", "--no-timing")
    assert "matched plain PEFT: all generated tokens equal" in output
    assert output.count("row ") == 6 and "__base__" in output


def test_generate_benchmark_smoke(tmp_path):
    """``bench_generate.py --small`` runs both modes on the CPU and writes its JSON with the correctness gate
    passing and no recompilation for a new assignment; ``report_generate.py`` turns it into a table and a plot."""
    import json

    out = tmp_path / "generate.json"
    output = run("benchmarks/bench_generate.py", "--small", "--out", str(out))
    assert "ours_torch" in output
    results = json.loads(out.read_text())["results"]
    ours = [result for result in results if result["row"] == "ours_torch"]
    assert {result["mode"] for result in ours} == {"eager", "compiled"}
    for result in ours:
        assert result["oracle_pass"] and result["oracle_rel_logit_error"] < 1e-5
        assert result["oracle_argmax_agreement"] == 1.0 and result["adapter_dtype"] == "model"
    assert [result["compilations_on_new_assignment"] for result in ours if result["mode"] == "compiled"] == [0]
    assert {result["row"] for result in results} >= {"base", "peft_single", "peft_mixed"}
    assert "peft_mixed" not in {result["row"] for result in results if result["mode"] == "compiled"}
    dora = [result for result in results if result["row"] == "ours_torch_dora"]
    assert len(dora) == 2 and all(r["argmax_agreement"] == 1.0 and r["rel_logit_error"] < 1e-5 for r in dora)
    table, plot = tmp_path / "generate.md", tmp_path / "generate.png"
    report = run("benchmarks/report_generate.py", str(out), "--table", str(table), "--plot", str(plot))
    assert "| compiled | 4 | 2 |" in report and table.read_text() in report + "\n"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_prints_backend_and_fair_timing():
    output = run("-m", "peft_fastlora", "demo", "--backend", "torch", "--max-new-tokens", "2")
    assert "patched by peft_fastlora: backend 'torch' (requested 'torch'" in output
    assert "generate, median of 5 calls after a warm-up: plain PEFT mixed batch " in output
    assert "median" not in run("-m", "peft_fastlora", "demo", "--max-new-tokens", "2", "--no-timing")


def test_demo_help_has_text_for_every_option():
    text = run("-m", "peft_fastlora", "demo", "--help")
    options = ["--backend", "--architecture", "--max-new-tokens", "--device", "--no-timing"]
    for option in options:
        assert option in text
    assert "``" not in text  # no raw RST
    for action in build_parser()[1]._actions:
        assert action.help, action.option_strings


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend", "triton", "--device", "cpu"], "--backend triton: backend 'triton' is not available: Triton"),
        (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0."),
        (
            ["--backend", "flashinfer", "--device", "cpu"],
            "--backend flashinfer: backend 'flashinfer' is not available",
        ),
    ],
)
def test_demo_user_errors_are_one_line_exit_2(args, message):
    line = run_failing("-m", "peft_fastlora", "demo", *args)
    assert message in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_demo_cuda_without_cuda_is_one_line_exit_2():
    line = run_failing("-m", "peft_fastlora", "demo", "--device", "cuda")
    assert line == (
        "python -m peft_fastlora demo: error: --device cuda was given, but CUDA is not available on this machine "
        "(use --device cpu)."
    )


def test_example_script_prints_each_row(tmp_path):
    base_dir = tmp_path / "base"
    tiny.save_base_model(base_dir, "llama", seed=3)
    tiny.save_tokenizer(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    tiny.save_adapter(base, tmp_path / "alpha", seed=1, r=4)
    tiny.save_adapter(base, tmp_path / "beta", seed=2, r=12)
    rows = [("alpha", "w5 w17 w9"), ("__base__", "w30 w31"), ("beta", "w8 w8 w8 w40"), ("alpha", "w99")]
    prompts = tmp_path / "prompts.tsv"
    prompts.write_text("".join(f"{name}\t{text}\n" for name, text in rows))
    output = run(
        "examples/mixed_generate.py", str(base_dir), f"alpha={tmp_path / 'alpha'}", f"beta={tmp_path / 'beta'}",
        "--prompts", str(prompts), "--max-new-tokens", "5", "--backend", "torch",
    )  # fmt: skip
    lines = output.strip().splitlines()
    assert len(lines) == len(rows)

    # Each printed completion must be what plain PEFT generates for that row alone.
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "alpha", "alpha")
    model.load_adapter(tmp_path / "beta", adapter_name="beta")
    model.eval()
    for line, (name, text) in zip(lines, rows, strict=True):
        single = tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            if name == "__base__":
                with model.disable_adapter():
                    ids = model.generate(**single, max_new_tokens=5, do_sample=False, pad_token_id=0)
            else:
                model.set_adapter(name)
                ids = model.generate(**single, max_new_tokens=5, do_sample=False, pad_token_id=0)
        expected = tokenizer.decode(ids[0, single["input_ids"].shape[1] :], skip_special_tokens=True)
        assert line.endswith(f"-> {expected!r}"), (line, expected)


@pytest.mark.parametrize(
    "adapter, lines, message",
    [
        ("alpha=", "alpha\tw5 w6\n", "error: adapter 'alpha=' must be NAME=FOLDER"),
        ("ALPHA", "alpha\tw5 w6\n", "error: adapter 'ALPHA' must be NAME=FOLDER"),
        ("alpha=missing-folder", "alpha\tw5\n", "error: adapter 'alpha': folder 'missing-folder' does not exist"),
        ("alpha=ADAPTER", "alpha w5 w6\n", "prompts.tsv, line 1: expected an adapter name, a tab, then the prompt"),
        ("alpha=ADAPTER", "\nalpha\tw5\nbase\tw6\n", "line 3: unknown adapter 'base' (loaded: alpha; or __base__)"),
        ("alpha=ADAPTER", "\n", "prompts.tsv: no prompts"),
    ],
)
def test_example_script_refuses_bad_input(tmp_path, adapter, lines, message):
    """A malformed NAME=FOLDER or prompts line is one line of error and exit status 2, before any model loads."""
    (tmp_path / "adapter").mkdir()
    prompts = tmp_path / "prompts.tsv"
    prompts.write_text(lines)
    adapter = adapter.replace("ADAPTER", str(tmp_path / "adapter"))
    line = run_failing("examples/mixed_generate.py", str(tmp_path / "base"), adapter, "--prompts", str(prompts))
    assert message in line
