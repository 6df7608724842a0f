"""Property-based fuzzing against unpatched PEFT: random adapters, batches and row assignments; mismatches: 0.

Each example builds a tiny Llama with 1-4 random adapters (ranks, alphas, rsLoRA, target modules including the
embedding and lm_head), a batch (size, length, left or right padding) and a row → adapter assignment that may
repeat names and use ``__base__``. PEFT's own mixed batch on the same model is the oracle: logits at the dtype's
tolerance and greedy tokens of a short generate equal.

Most examples then edit adapter x0 the ways users do after a call (``.data`` writes, NumPy views, ``.data =``,
``set_scale``), alike in the patched model and in an unpatched copy, and compare the next call again.

``FUZZ_EXAMPLES`` scales the example counts (CI runs the defaults; the device runs the bf16 variant with more).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers import assert_close_relative, assert_unpatched, fp32_oracle, interpreted, oracle_error
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from test_storage import data_assign, data_copy, data_mul, edit_every_layer, numpy_write, set_scale

from peft_fastlora import patch_model, tiny, unpatch_model

TARGETS = [*tiny.TARGET_MODULES["llama"], "embed_tokens", "lm_head"]
SCALE = float(os.environ.get("FUZZ_EXAMPLES", "1"))
# FUZZ_NO_SHRINK=1 reports a failing example as found, without hypothesis' shrinking (which can run for minutes of
# device time on a GPU test).
PHASES = [Phase.explicit, Phase.reuse, Phase.generate] if os.environ.get("FUZZ_NO_SHRINK") else list(Phase)


def fuzz_settings(examples: int, derandomize: bool = False):
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        phases=PHASES,
        derandomize=derandomize,
        deadline=None,
        database=None,  # no .hypothesis folder in the checkout; failures print their example
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@st.composite
def scenarios(draw, max_batch: int = 6, max_length: int = 9):
    adapters = [
        {
            "r": draw(st.sampled_from([1, 2, 4, 8, 16])),
            "lora_alpha": draw(st.sampled_from([1, 8, 16, 32])),
            "use_rslora": draw(st.booleans()),
            "target_modules": draw(st.lists(st.sampled_from(TARGETS), min_size=1, max_size=len(TARGETS), unique=True)),
        }
        for _ in range(draw(st.integers(1, 4)))
    ]
    batch_size = draw(st.integers(1, max_batch))
    choices = [f"x{index}" for index in range(len(adapters))] + ["__base__"]
    names = draw(st.lists(st.sampled_from(choices), min_size=batch_size, max_size=batch_size))
    return {
        "adapters": adapters,
        "names": names,
        "length": draw(st.integers(1, max_length)),
        "left_padding": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
        # PEFT's autocast_adapter_dtype: True (its default) keeps a bf16 model's adapters in fp32 (no-op in fp32).
        "autocast": draw(st.booleans()),
        # An edit of adapter x0 after the first patched call, made to the model and to an unpatched copy alike.
        "edit": draw(st.sampled_from([None, *EDITS])),
    }


def build(scenario: dict, dtype: torch.dtype, device: str):
    torch.manual_seed(scenario["seed"])
    model = None
    for index, spec in enumerate(scenario["adapters"]):
        config = LoraConfig(init_lora_weights=False, **spec)
        if model is None:
            base = tiny.build_base_model("llama", seed=scenario["seed"], dtype=dtype)
            model = get_peft_model(base, config, adapter_name=f"x{index}", autocast_adapter_dtype=scenario["autocast"])
        else:
            model.add_adapter(f"x{index}", config, autocast_adapter_dtype=scenario["autocast"])
    batch = tiny.random_prompts(
        len(scenario["names"]), scenario["length"], seed=scenario["seed"], left_padding=scenario["left_padding"]
    )
    return model.to(device).eval(), {key: value.to(device) for key, value in batch.items()}


EDITS = {
    "lora_B.data.copy_": edit_every_layer(data_copy, "x0", "B"),
    "lora_A.data.mul_": edit_every_layer(data_mul, "x0", "A"),
    "numpy_view": edit_every_layer(numpy_write, "x0", "B"),
    "data_assign": edit_every_layer(data_assign, "x0", "A"),
    "set_scale": set_scale("x0"),
}


def assert_close_to_peft(actual: torch.Tensor, expected: torch.Tensor, peft, batch: dict, names: list, rtol: float):
    """``actual`` within ``rtol`` of PEFT's ``expected`` (from the unpatched model ``peft``), or, where the two differ
    by more than that, within ``ROUNDING_SPREAD`` times the worse of PEFT's own two fp32 results' errors against an
    fp64 copy of ``peft`` (its mixed batch, ``expected``, and its merged weights, ``merge_and_unload``), and never
    more than ``MAX_FP32_ERROR`` from it.

    Large scalings amplify rounding. With one rsLoRA adapter of rank 1 and alpha 32 (scaling 32) on q/k/v/gate
    (``fp32_rounding_errors``, 30 seeds × before and after an edit, interpreted Triton on the CPU), PEFT's merged
    weights, the same adapter summed in another order, were 2.4x as far from fp64 as its mixed batch in the median
    and up to 30x, and ours 1.0x in the median, up to 7.6x PEFT's mixed batch and 2.5x the worse of PEFT's two.
    A stale or wrong weight is off by 0.1-1, TF32 in an fp32 path by ~1e-3 (more where rounding is amplified).
    ``test_fp32_accuracy_is_within_peft_own_orders`` holds ours to PEFT's orders in aggregate."""
    if (actual.float() - expected.float()).abs().max() <= rtol * expected.abs().max().clamp_min(1e-12):
        assert not torch.isnan(actual).any(), "output has NaN"
        return
    truth = fp64_logits(peft, batch, names)
    peft_error = max(relative_error(expected, truth), relative_error(merged_logits(peft, batch, names), truth))
    assert_close_relative(actual.double(), truth, rtol=min(max(rtol, ROUNDING_SPREAD * peft_error), MAX_FP32_ERROR))


ROUNDING_SPREAD = 4.0
"""How far one example's fp32 result may be from fp64, in units of the worse of PEFT's two fp32 orders' distance,
where ours and PEFT's differ by more than the 1e-5 bar (``assert_close_to_peft``): one order against another
varies up to 30x on the same example, ours against the worse of PEFT's up to 2.5x (60 cases on the CPU); the H200
found 2.9x against PEFT's mixed batch alone (session 34: 3.4e-5 against 1.2e-5)."""

MAX_FP32_ERROR = 2e-4
"""The cap of ``assert_close_to_peft``'s bar, whatever PEFT's own errors: PEFT's fp32 orders reached 1.2e-4 and ours
4.9e-5 in the 60 CPU cases above, so a broken PEFT reference cannot widen the bar past what rounding explains."""


def amplifying_scenario(seed: int, edit: str | None = None) -> dict:
    """A fuzzing scenario that amplifies fp32 rounding: one rsLoRA adapter of rank 1 and alpha 32 (scaling 32) on
    q/k/v/gate, five of seven rows."""
    return {
        "adapters": [{"r": 1, "lora_alpha": 32, "use_rslora": True, "target_modules": ["k_proj", "v_proj",
                      "gate_proj", "q_proj"]}],
        "names": ["x0", "__base__", "x0", "x0", "x0", "x0", "__base__"],
        "length": 7, "left_padding": False, "seed": seed, "autocast": False, "edit": edit,
    }  # fmt: skip


def fp64_logits(peft, batch: dict, names: list) -> torch.Tensor:
    """The logits of an fp64 copy of the unpatched model ``peft`` (PEFT's mixed batch): the fuzzing's fp32 truth."""
    return copy.deepcopy(peft).to(torch.float64)(**batch, adapter_names=names).logits


@torch.no_grad()
def merged_logits(peft, batch: dict, names: list) -> torch.Tensor:
    """PEFT's logits for ``names`` through merged weights: each row from a copy of ``peft`` with its adapter merged
    into the base weights (``merge_and_unload``; ``__base__`` rows from the copy with adapters disabled)."""
    by_name = {}
    for name in set(names):
        if name == "__base__":
            with peft.disable_adapter():  # (restores the adapters on exit: no copy needed)
                by_name[name] = peft(**batch).logits
        else:
            by_name[name] = copy.deepcopy(peft).merge_and_unload(adapter_names=[name])(**batch).logits
    return torch.stack([by_name[name][index] for index, name in enumerate(names)])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest absolute difference relative to ``expected``'s largest magnitude (``assert_close_relative``'s)."""
    return ((actual.double() - expected.double()).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def check(scenario: dict, backend: str, dtype=torch.float32, device="cpu", rtol=1e-5) -> None:
    model, batch = build(scenario, dtype, device)
    peft = copy.deepcopy(model)  # unpatched, for an fp64 look where PEFT's own fp32 is off (assert_close_to_peft)
    names = scenario["names"]
    generate = {"max_new_tokens": 2, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        expected = model(**batch, adapter_names=names).logits
        expected_tokens = (
            model.generate(**batch, adapter_names=names, **generate) if scenario["left_padding"] else None
        )
        patch_model(model, backend=backend)
        assert_close_to_peft(model(**batch, adapter_names=names).logits, expected, peft, batch, names, rtol)
        if expected_tokens is not None and dtype == torch.float32:
            assert torch.equal(model.generate(**batch, adapter_names=names, **generate), expected_tokens)
        if scenario["edit"]:
            for target in (model, peft):
                EDITS[scenario["edit"]](target, seed=scenario["seed"])
            expected = peft(**batch, adapter_names=names).logits
            assert_close_to_peft(model(**batch, adapter_names=names).logits, expected, peft, batch, names, rtol)
        unpatch_model(model)


@fuzz_settings(40)
@given(scenario=scenarios())
def test_fuzz_torch_backend(scenario):
    check(scenario, "torch")


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(), reason="needs Triton (GPU or interp.)"
)
@fuzz_settings(6)
@given(scenario=scenarios(max_batch=4, max_length=4))
def test_fuzz_triton_backend(scenario):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check(scenario, "triton", device=device)


@pytest.mark.parametrize(
    "device", [pytest.param("cpu", marks=interpreted), pytest.param("cuda", marks=pytest.mark.gpu)]
)
def test_amplified_fp32_rounding_is_judged_against_peft_merged_too(device):
    """The example the H200's fuzzing found (session 34, seed 239): before the edit ours 3.4e-5 off fp64 against
    PEFT's mixed batch 1.2e-5 (run A); after it, in another run, ours 1.6e-5 against 1.2e-5 for both of PEFT's
    orders (run C). On the CPU (interpreted) ours 1.2e-5, PEFT's mixed batch 5.3e-6 and its merged weights 8.4e-5
    on one row (``assert_close_to_peft``)."""
    check(amplifying_scenario(239, "lora_A.data.mul_"), "triton", device=device)


def fp32_rounding_errors(seed: int, device: str) -> list[tuple[float, float, float]]:
    """(PEFT's mixed batch, PEFT's merged weights, ours): each fp32 result's relative error against an fp64 copy, for
    an example that amplifies rounding (``amplifying_scenario``), before and after ``lora_A`` is scaled by -1.5 in
    place."""
    scenario = amplifying_scenario(seed)
    model, batch = build(scenario, torch.float32, device)
    peft, names, errors = copy.deepcopy(model), scenario["names"], []
    with torch.no_grad():
        patch_model(model, backend="triton")
        for edit in (None, EDITS["lora_A.data.mul_"]):
            if edit is not None:
                for target in (model, peft):
                    edit(target, seed=seed)
            truth = fp64_logits(peft, batch, names)
            errors.append(tuple(relative_error(logits, truth) for logits in (
                peft(**batch, adapter_names=names).logits, merged_logits(peft, batch, names),
                model(**batch, adapter_names=names).logits)))  # fmt: skip
    return errors


@pytest.mark.parametrize(
    "device", [pytest.param("cpu", marks=interpreted), pytest.param("cuda", marks=pytest.mark.gpu)]
)
def test_fp32_accuracy_is_within_peft_own_orders(device):
    """Over 8 fixed seeds of an example that amplifies rounding, ours' mean fp32 error against fp64 is no larger than
    that of PEFT's merged weights, the less accurate of PEFT's own two fp32 orders (what ``ROUNDING_SPREAD`` lets
    one example do, ours may not do on the whole). CPU (interpreted Triton): PEFT mixed 3.8e-6, merged 2.1e-5, ours
    6.0e-6 (12 seeds: 4.5e-6, 2.0e-5, 6.4e-6)."""
    errors = [error for seed in range(230, 238) for error in fp32_rounding_errors(seed, device)]
    peft_mixed, peft_merged, ours = (sum(column) / len(errors) for column in zip(*errors, strict=True))
    assert ours <= peft_merged, f"mean error: ours {ours:.3g}, PEFT mixed {peft_mixed:.3g}, merged {peft_merged:.3g}"


def low_precision_errors(scenario: dict, backend: str, dtype: torch.dtype, device: str) -> dict:
    """One example in bf16/fp16: relative error and argmax agreement (over unpadded positions) of PEFT's mixed batch
    and of ours (the same model patched) against an fp32 copy of the model and adapters run by PEFT, and the number
    of positions compared."""
    model, batch = build(scenario, dtype, device)
    names, mask = scenario["names"], batch["attention_mask"]
    oracle = fp32_oracle(model)
    with torch.no_grad():
        expected = oracle(**batch, adapter_names=names).logits
        peft = model(**batch, adapter_names=names).logits
        assert_unpatched(model)
        patch_model(model, backend=backend)
        ours = model(**batch, adapter_names=names).logits
    return {"ours": oracle_error(ours, expected, mask), "peft": oracle_error(peft, expected, mask), "n": mask.sum()}


def fuzz_no_worse_than_peft(
    backend: str,
    dtype: torch.dtype,
    device: str,
    examples: int,
    derandomize: bool = False,
    exact_fp32: bool = False,
    **sizes,
) -> None:
    """DESIGN §6's bar for bf16/fp16, over a fuzzing run: against the fp32 oracle, ours' mean relative error is at
    most 1.1x PEFT's and ours' argmax agreement (over all positions) at least PEFT's - 0.01.

    The bar is pooled over the run's examples because one tiny example (a few positions of a 64-wide model) is
    too small a sample: correct code with another summation order than PEFT's was measured at 1.35x PEFT's error
    on one 56-position example (fp16, interpreted Triton on CPU), ~1.0x pooled. Each example must still stay within
    2x PEFT's error plus four times the dtype's resolution, so that one broken example cannot hide in the pool (a
    row served stale or another adapter's weights is off by 0.3-1.4, see the bank-as-storage issue).

    The resolution term is not smaller because one example's bf16 error is itself noise: on the H200 (session 27)
    an 11-position example with rsLoRA scalings of 8 and 16 had ours 0.050 and PEFT 0.014, identical on the
    previous release, and the same scenario with seeds 1 and 2 gave ours 0.009 / 0.043 against PEFT 0.012 / 0.049;
    PEFT's own error for seed 0 was 0.031 on the CPU. ``exact_fp32`` also runs each example in fp32 against PEFT at
    1e-5 with greedy tokens equal (``check``): an exact per-example bar that no rounding noise can hide behind."""
    runs = []
    resolution = 1e-2 if dtype == torch.bfloat16 else 1e-3

    @fuzz_settings(examples, derandomize)
    @given(scenario=scenarios(**sizes))
    def run(scenario):
        errors = low_precision_errors(scenario, backend, dtype, device)
        (ours, _), (peft, _) = errors["ours"], errors["peft"]
        assert ours <= 2 * peft + 4 * resolution, f"one example far worse than PEFT: {errors}"
        if exact_fp32:
            check(scenario, backend, device=device)
        runs.append(errors)

    run()
    ours_error = sum(run["ours"][0] for run in runs) / len(runs)
    peft_error = sum(run["peft"][0] for run in runs) / len(runs)
    positions = sum(float(run["n"]) for run in runs)
    ours_agreement = sum(run["ours"][1] * float(run["n"]) for run in runs) / positions
    peft_agreement = sum(run["peft"][1] * float(run["n"]) for run in runs) / positions
    summary = (
        f"{len(runs)} examples, {positions:.0f} positions: mean error ours {ours_error:.4g} PEFT {peft_error:.4g}; "
        f"agreement ours {ours_agreement:.4f} PEFT {peft_agreement:.4f}"
    )
    print(summary)
    assert ours_error <= 1.1 * peft_error + 1e-6, summary
    assert ours_agreement >= peft_agreement - 0.01, summary


@interpreted
def test_fuzz_fp16_interpreted():
    """The bf16 GPU fuzzing's comparison, on CPU: fp16 through interpreted Triton (which differs from PEFT's
    summation order as the GPU kernels do). Derandomized, yet the examples drawn still differ from run to run; 8
    small ones (~65 positions) failed the agreement bar by one near-tie (1.5 points, with ours' error below PEFT's):
    24 examples of up to 6 rows x 8 tokens (~300 positions) make one near-tie a third of a point."""
    fuzz_no_worse_than_peft("triton", torch.float16, "cpu", 24, derandomize=True, max_batch=6, max_length=8)


@pytest.mark.gpu
def test_fuzz_bf16_on_gpu():
    """bf16 against an fp32 oracle, no worse than PEFT's own bf16 mixed batch (DESIGN §6). The old bar, PEFT's bf16
    logits at 3e-2, failed at 0.0853 with a rank-1, alpha-32 adapter: two bf16 computations of the same thing
    differ more than either differs from fp32. Greedy tokens are compared in fp32 only (near-ties): each example
    also runs in fp32 against PEFT at 1e-5 (``exact_fp32``)."""
    fuzz_no_worse_than_peft("triton", torch.bfloat16, "cuda", 60, exact_fp32=True, max_batch=8, max_length=16)
