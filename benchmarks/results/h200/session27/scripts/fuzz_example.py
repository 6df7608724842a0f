"""The bf16 fuzz example that failed the per-example bar in run A, on the GPU: its errors against the fp32 oracle
(ours and PEFT, Triton), and the fp32 exact check of the same scenario (ours vs PEFT at 1e-5, greedy tokens equal).
Run with the package under test first on PYTHONPATH (this session's code, or session 26's final code)."""

import sys

import torch

sys.path.insert(0, "tests")
from test_fuzz import check, low_precision_errors  # noqa: E402

import peft_fastlora  # noqa: E402

T = ["gate_proj", "q_proj", "lm_head", "v_proj", "down_proj", "k_proj", "up_proj", "o_proj", "embed_tokens"]
scenario = {
    "adapters": [
        {"r": 1, "lora_alpha": 8, "use_rslora": True, "target_modules": T},
        {"r": 4, "lora_alpha": 32, "use_rslora": True, "target_modules": T},
        {"r": 4, "lora_alpha": 32, "use_rslora": True, "target_modules": ["down_proj", "q_proj", "up_proj"]},
    ],
    "names": ["x1", "x0", "x0"],
    "length": 4,
    "left_padding": True,
    "seed": 0,
    "autocast": True,
    "edit": "lora_A.data.mul_",
}
print("package:", peft_fastlora.__file__)
for seed in (0, 1, 2):
    errors = low_precision_errors({**scenario, "seed": seed}, "triton", torch.bfloat16, "cuda")
    print(
        f"seed {seed} bf16 ours {float(errors['ours'][0]):.5f}/{float(errors['ours'][1]):.4f} "
        f"peft {float(errors['peft'][0]):.5f}/{float(errors['peft'][1]):.4f} n {int(errors['n'])}"
    )
check(scenario, "triton", device="cuda")
print("fp32 exact check (with the edit): passed")
