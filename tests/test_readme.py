"""The README's quickstart runs as pasted (with a local tiny Llama standing in for the Hub model)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from peft_fastlora import tiny

ROOT = Path(__file__).resolve().parents[1]
HUB_MODEL = '"hf-internal-testing/tiny-random-LlamaForCausalLM"'


def python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [textwrap.dedent(block) for block in re.findall(r"```python\n(.*?)^ *```", text, re.S | re.M)]


def test_quickstart_runs_as_pasted(tmp_path):
    """The quickstart, then the transformers-native snippet of "Serving your own adapters" after it."""
    base_dir = tmp_path / "tiny-llama"
    tiny.save_base_model(base_dir, "llama", seed=0)
    tiny.save_tokenizer(base_dir)
    quickstart = next(block for block in python_blocks() if HUB_MODEL in block)
    native = next(block for block in python_blocks() if "model.load_adapter(" in block and "PeftModel" not in block)
    script = quickstart.replace(HUB_MODEL, repr(str(base_dir))) + "\nprint('native')\n" + native
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[0].startswith("patched by peft_fastlora: backend 'torch' (requested 'auto'")
    assert len(lines) == 1 + 4 + 1 and lines[1].startswith("'Hello, my name is' -> ")
    assert (tmp_path / "adapters" / "a" / "adapter_model.safetensors").exists()
