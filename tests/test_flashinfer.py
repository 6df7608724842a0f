"""The FlashInfer backend: its clear error without the extra (CPU), its plumbing against a stand-in for FlashInfer's
wrapper (CPU: segments, padding, the sm80 add-into and sm90 overwrite semantics), and on a GPU with FlashInfer
installed the kernel grid against the per-token reference in bf16 and fp16 on both code paths, and the
end-to-end mixed batch against an fp32 oracle (no worse than PEFT)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import assert_no_worse_than_peft, gpu_test_model, oracle_batch
from peft import LoraConfig, get_peft_model
from test_kernels import RANKS, assignment, check, random_packed

from peft_fastlora import patch_model, tiny
from peft_fastlora.backends import BACKEND_NAMES, get_backend
from peft_fastlora.backends import flashinfer as fi
from peft_fastlora.bank import BASE_SLOT
from peft_fastlora.layers import is_fast_layer
from peft_fastlora.plan import BatchPlan

HAVE_FLASHINFER = importlib.util.find_spec("flashinfer") is not None
needs_flashinfer = pytest.mark.skipif(
    not HAVE_FLASHINFER, reason="flashinfer is not installed (the [flashinfer] extra)"
)


@pytest.fixture
def without_flashinfer(monkeypatch):
    """Make ``flashinfer`` look uninstalled, whether or not it is."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flashinfer" else real(name, *a))


@pytest.fixture
def with_flashinfer(monkeypatch):
    """Make ``flashinfer`` look installed (for the registry's choices; nothing imports it)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "flashinfer" else real(name, *a)
    )


# -- the registry -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_missing_extra_gives_a_clear_error(without_flashinfer, device):
    assert "flashinfer" in BACKEND_NAMES
    with pytest.raises(RuntimeError) as raised:
        get_backend("flashinfer", torch.device(device))
    assert str(raised.value) == (
        "peft_fastlora backend 'flashinfer' is not available: flashinfer is not installed; install the extra: "
        "pip install 'peft-fastlora[flashinfer]'"
    )


def test_missing_extra_leaves_the_model_unpatched(without_flashinfer):
    model = get_peft_model(tiny.build_base_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(RuntimeError, match=r"install the extra: pip install 'peft-fastlora\[flashinfer\]'"):
        patch_model(model, backend="flashinfer")
    assert not any(is_fast_layer(module) for module in model.modules())


def test_flashinfer_needs_cuda(with_flashinfer):
    with pytest.raises(RuntimeError, match="FlashInfer's segmented GEMM needs a CUDA GPU \\(the model is on cpu\\)"):
        get_backend("flashinfer", torch.device("cpu"))


def test_auto_keeps_triton_where_flashinfer_is_installed(with_flashinfer):
    """FlashInfer was not measured faster than Triton, and needs host values per call (not graph-safe): auto keeps
    Triton on CUDA and torch elsewhere."""
    assert get_backend("auto", torch.device("cuda")).name == "triton"
    assert get_backend("auto", torch.device("cpu")).name == "torch"


# -- the plumbing, against a stand-in for FlashInfer's wrapper (CPU) ---------------------------------------------


class StandInWrapper:
    """``SegmentGEMMWrapper.run``'s contract in plain torch: ``out[seg] (+)= x[seg] @ W[weight_indices[seg]]`` with
    W ``[d_out, d_in]`` (column major) or ``[d_in, d_out]``; the sm80 kernel adds into ``out``, sm90 overwrites."""

    def __init__(self, adds: bool):
        self.adds = adds
        self.calls = 0

    def run(self, x, weights, batch_size, weight_column_major, out, seg_indptr, weight_indices):
        self.calls += 1
        bounds = seg_indptr.tolist()
        assert len(bounds) == batch_size + 1 and weight_indices.dtype == seg_indptr.dtype == torch.int64
        assert x.dtype == weights.dtype == out.dtype and x.is_contiguous() and out.is_contiguous()
        for segment in range(batch_size):
            rows = slice(bounds[segment], bounds[segment + 1])
            weight = weights[weight_indices[segment]]
            product = x[rows].float() @ (weight.t() if weight_column_major else weight).float()
            out[rows] = (out[rows].float() + product if self.adds else product).to(out.dtype)
        return out


def stand_in_backend(path: str, monkeypatch) -> fi.FlashInferBackend:
    backend = fi.FlashInferBackend(gemm_path=path)
    backend._wrappers[torch.device("cpu")] = (StandInWrapper(adds=path == "sm80"), path)
    monkeypatch.setattr(backend, "_unsupported", lambda x, packed: None)  # CPU tensors, for the stand-in
    return backend


def check_against_reference(backend, rows, tokens_per_row, popularity, dtype, device, k=72, n=136, ranks=RANKS,
                            absent=(), flatten=False):  # fmt: skip
    """``backend.add_lora`` against the per-token fp32 reference (``test_kernels.check``)."""
    return check(rows, tokens_per_row, popularity, dtype, device, k, n, ranks, absent, flatten, backends=(backend,))


@pytest.mark.parametrize("path", ["sm80", "sm90"])
@pytest.mark.parametrize("popularity", ["identical", "distinct", "uniform", "zipf", "skewed", "all_base"])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_plumbing_with_stand_in(path, popularity, rows, monkeypatch):
    backend = stand_in_backend(path, monkeypatch)
    check_against_reference(backend, rows, 1, popularity, torch.float32, "cpu")


@pytest.mark.parametrize("path", ["sm80", "sm90"])
def test_plumbing_prefill_flattened_absent_and_uniform(path, monkeypatch):
    backend = stand_in_backend(path, monkeypatch)
    check_against_reference(backend, 3, 7, "distinct", torch.float32, "cpu", ranks=[8, 64, 4])
    check_against_reference(backend, 4, 5, "uniform", torch.float32, "cpu", flatten=True)
    check_against_reference(backend, 6, 1, "distinct", torch.float32, "cpu", ranks=[16, 8, 4], absent=(1,))
    check_against_reference(backend, 9, 2, "uniform", torch.float16, "cpu", ranks=[16, 16, 16])


def test_segments_are_built_once_per_call_and_skip_absent_slots(monkeypatch):
    backend = stand_in_backend("sm90", monkeypatch)
    plan = BatchPlan("cpu")
    plan.fill([2, BASE_SLOT, 0, 2, 1, 0])
    view = plan.view(6, flattened=False)
    segments = backend._segments_for(view, 2, (0, 2), torch.device("cpu"))
    assert segments.token_rows.tolist() == [4, 5, 10, 11, 0, 1, 6, 7]  # slot 0's rows (2, 5), then slot 2's (0, 3)
    assert segments.indptr.tolist() == [0, 4, 8] and segments.slot_ids.tolist() == [0, 2]
    assert backend._segments_for(view, 2, (0, 2), torch.device("cpu")) is segments  # other layers reuse it
    plan.fill([0, 1])
    assert backend._segments_for(plan.view(2, flattened=False), 2, (0, 2), torch.device("cpu")) is not segments


def test_padded_weights_pad_in_scratch():
    mixed = random_packed([4, 12, 3], 24, 40, torch.float32, "cpu", absent=(2,))
    weights = fi._padded_weights(mixed, (1, 0))
    assert weights.a.shape == (2, 16, 24) and weights.b.shape == (2, 16, 40)  # 12 -> 16
    x = torch.randn(5, 24)
    for index, slot in enumerate((1, 0)):
        a, b, scale = mixed.adapter(slot)
        torch.testing.assert_close(x @ weights.a[index].t() @ weights.b[index], (x @ a.t() @ b.t()) * scale)
    before = mixed.a.clone()
    weights.a.fill_(1.0)
    assert torch.equal(mixed.a, before)  # scratch, never the bank


def test_unsupported_layers_fall_back_with_one_warning(monkeypatch):
    """fp32 adapters (PEFT's default on a bf16 model) and unaligned features go to the Triton/torch path."""
    backend = fi.FlashInferBackend()
    packed = random_packed([4, 8], 24, 40, torch.float32, "cpu")
    plan = BatchPlan("cpu")
    plan.fill([0, 1, BASE_SLOT])
    view = plan.view(3, flattened=False)
    x, y = torch.randn(3, 1, 24), torch.randn(3, 1, 40)
    expected = y.clone()
    fi.TorchBackend().add_lora(expected, x, packed, view)
    with pytest.warns(UserWarning, match="takes fp16/bf16 weights and these layers' adapters are torch.float32"):
        backend.add_lora(y, x, packed, view)
    torch.testing.assert_close(y, expected)
    assert "multiples of 8" in backend._unsupported(x.half(), random_packed([4], 20, 40, torch.float16, "cpu"))


def test_rejects_unknown_gemm_path():
    with pytest.raises(ValueError, match="gemm_path must be"):
        fi.FlashInferBackend(gemm_path="sm100")


# -- on the GPU, with FlashInfer ---------------------------------------------------------------------------------

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
UNIFORM = [16, 16, 16, 16]


@pytest.fixture(scope="module")
def backends():
    """One backend per code path for the module (the wrappers and their workspaces are made once)."""
    return {path: fi.FlashInferBackend(gemm_path=path) for path in ("auto", "sm80")}


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("ranks", [RANKS, UNIFORM], ids=["mixed_ranks", "uniform_rank"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("popularity", ["identical", "distinct", "uniform", "zipf", "skewed", "all_base"])
@pytest.mark.parametrize("rows", [1, 3, 32, 257])
@pytest.mark.parametrize("k,n", SHAPES)
def test_real_sizes_gpu(rows, popularity, dtype, k, n, ranks, backends):
    check_against_reference(backends["auto"], rows, 1, popularity, dtype, "cuda", k=k, n=n, ranks=ranks)


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("ranks", [RANKS, UNIFORM], ids=["mixed_ranks", "uniform_rank"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("popularity", ["distinct", "zipf", "all_base"])
@pytest.mark.parametrize("rows", [3, 257])
@pytest.mark.parametrize("k,n", SHAPES)
def test_sm80_path_gives_the_same_result_gpu(rows, popularity, dtype, k, n, ranks, backends):
    """The sm80 kernel adds into ``out`` where the sm90 one overwrites it: on Hopper both paths run, and agree."""
    auto, sm80 = backends["auto"], backends["sm80"]
    check_against_reference(sm80, rows, 1, popularity, dtype, "cuda", k=k, n=n, ranks=ranks)
    seed = int(torch.randint(0, 2**31, ()))
    results = []
    for backend in (auto, sm80):
        torch.manual_seed(seed)
        packed = random_packed(ranks, k, n, dtype, "cuda")
        plan = BatchPlan("cuda")
        plan.fill(assignment(popularity, rows, len(ranks), torch.Generator().manual_seed(seed)))
        x = torch.randn(rows, 1, k, device="cuda").to(dtype)
        y = torch.randn(rows, 1, n, device="cuda").to(dtype)
        backend.add_lora(y, x, packed, plan.view(rows, flattened=False))
        results.append(y)
    # Same inputs, both paths accumulate in fp32 and round h and the delta to the dtype: equal up to a rounding.
    scale = results[0].float().abs().max()
    assert (results[0].float() - results[1].float()).abs().max() / scale <= {torch.bfloat16: 8e-3}.get(dtype, 1e-3)


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("path", ["auto", "sm80"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_flattened_and_absent_gpu(path, dtype, backends):
    backend = backends[path]
    check_against_reference(backend, 8, 512, "distinct", dtype, "cuda", k=4096, n=4096, ranks=[16, 64, 8, 128])
    check_against_reference(backend, 4, 33, "uniform", dtype, "cuda", k=4096, n=1024, flatten=True)
    check_against_reference(backend, 16, 1, "distinct", dtype, "cuda", k=4096, n=4096, absent=(1, 3))


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast_adapter_dtype", [False, True], ids=["model_dtype", "fp32_adapters"])
def test_low_precision_no_worse_than_peft_gpu(dtype, autocast_adapter_dtype, tmp_path, recwarn):
    """End to end, a mixed batch of 128 rows x 256 tokens against an fp32 oracle: no worse than PEFT's own
    (DESIGN §6). Adapters in the model's dtype run FlashInfer; fp32 adapters (PEFT's default) fall back to Triton."""
    model, names, _ = gpu_test_model(dtype, tmp_path, autocast_adapter_dtype, device="cuda")
    batch, names = oracle_batch(names, "cuda", 128, 256)
    assert_no_worse_than_peft(model, batch, names, "flashinfer")
    assert model.base_model._fastlora_state.backend.name == "flashinfer"
    fell_back = any("those layers run the Triton kernels" in str(w.message) for w in recwarn)
    assert fell_back == autocast_adapter_dtype
