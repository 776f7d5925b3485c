"""How the Triton backend launches: planned launches (what the ahead-of-time table compiles), FP
contraction, stages, split-K, the device guard, the autotuner, row maps, 64-bit offsets, and the
CUDA module's architecture check. CPU tests: planning needs no GPU, kernels run in the
interpreter."""

import ast
import contextlib
import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch

import qla_kernels as qk
from qla_kernels import ops
from qla_kernels.ops import RowMap, cuda, reference
from qla_kernels.ops.triton import kernel_launch, launch, tuning
from qla_kernels.ops.triton.kernel_launch import A100, H100, Target, compile_key, planning
from qla_kernels.quant import quantize_weight

from .helpers import random_int8, random_weight

pytestmark = pytest.mark.skipif(not qk.backends()["triton"].available, reason=str(qk.backends()["triton"]))
META = torch.device("meta")


def _meta_weight(fmt: str, n: int, k: int, group: int = 128):
    return random_weight(fmt, n, k, group=group).to(META)


def _plan(target, fn):
    with planning(target) as launches, torch.no_grad():
        fn()
    return launches


def _gemm(fmt="int8", m=12608, n=3072, k=768, dtype=torch.float16, **kwargs):
    weight = _meta_weight(fmt, n, k)
    if fmt == "uint4_asym_groups":
        a, scale = torch.empty(m, k, device=META, dtype=dtype), None
    else:
        a, scale = torch.empty(m, k, device=META, dtype=torch.int8), torch.empty(m, device=META)
    return lambda: ops.fused_linear(a, scale, weight, out_dtype=dtype, **kwargs)


# ---------------------------------------------------------------- planning


def test_planning_records_every_candidate_and_launches_nothing():
    launches = _plan(H100, _gemm(bias=torch.empty(3072, device=META, dtype=torch.float16)))
    assert [launch.meta["BLOCK_M"] for launch in launches] == [c.block_m for c in tuning.SM90_GEMM_CONFIGS]
    launches = _plan(A100, _gemm())
    assert len(launches) == len(tuning.SM80_GEMM_CONFIGS)
    with pytest.raises(ValueError, match="GPU target"):
        with planning(kernel_launch.INTERPRETER):
            pass


def test_every_launch_names_its_warps_stages_and_contraction():
    """Triton's defaults (3 stages, contraction on) would be choices the AOT check does not see."""
    with pytest.raises(ValueError, match="must set"):
        kernel_launch.run_kernel(launch.fused_linear_kernel, (1,), torch.device("cpu"), (), num_warps=4)


def test_compile_key_follows_triton_specialization():
    kernel = launch.requantize_rows_kernel
    y = torch.empty(16, 32, device=META)
    base = dict(QMAX=127, BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1, enable_fp_fusion=False)
    key = lambda rows, **meta: compile_key(kernel, (y, y, y, y, rows, 32, 32, 32), {**base, **meta})  # noqa: E731
    assert key(1) != key(2) != key(32)  # 1 is a constant, 32 divisible by 16, 2 neither
    assert key(17) == key(18) and key(32) == key(48)
    assert key(32) != key(32, num_stages=2)


def test_fp_contraction_is_off_where_exactness_is_promised():
    """acc·s_x·s_w + bias (+ residual) contracted into one FMA rounds once where the reference
    rounds twice: integer formats, requantization and the pre-kernel launch without contraction."""
    bias = torch.empty(3072, device=META, dtype=torch.float16)
    for fmt in ("int8", "int4", "int4_int8_groups"):
        for launched in _plan(H100, _gemm(fmt, bias=bias, requant_bits=8)):
            assert launched.meta["enable_fp_fusion"] is False, launched.kernel
    x = torch.empty(64, 768, device=META, dtype=torch.float16)
    for launched in _plan(H100, lambda: ops.quantize_activation(x, 8, norm_kind="rmsnorm")):
        assert launched.meta["enable_fp_fusion"] is False
    for launched in _plan(H100, _gemm("uint4_asym_groups", m=64)):
        assert launched.meta["enable_fp_fusion"] is True  # W4A16 is an fp dot: it may contract


@pytest.mark.parametrize("rank, down_dtype", [(128, torch.float32), (128, torch.float16), (16, torch.float16)])
def test_pre_kernel_tiles_follow_the_down_projection(rank, down_dtype):
    """A rank-128 fp32 T at BLOCK_K 256 needed ~297 KB of shared memory at 3 stages: the A tile
    is bounded and the stages are chosen, not Triton's default."""
    x = torch.empty(2048, 4096, device=META, dtype=torch.float16)
    down = torch.empty(4096, rank, device=META, dtype=down_dtype)
    for target in (H100, A100):
        (launched,) = _plan(target, lambda: ops.quantize_activation(x, 8, down_proj=down, down_from_input=True))
        meta = launched.meta
        assert meta["BLOCK_K"] * meta["BLOCK_R"] <= launch._PREOP_DOWN_TILE_VALUES and meta["num_stages"] == 1


def test_split_count_is_a_runtime_argument():
    """Each new split count recompiled both split-K phases (mid-decode, inside graph capture) while
    it was a constexpr; now shapes with different split counts launch the same compiled kernels."""
    keys, counts = [], []
    for n in (4096, 6144):
        launches = _plan(H100, _gemm("uint4_asym_groups", m=1, n=n, k=14336))
        assert {launched.meta["SPLIT_PHASE"] for launched in launches} == {1, 2}
        counts.append([launched.grid[1] for launched in launches if launched.meta["SPLIT_PHASE"] == 1])
        keys.append({launched.key for launched in launches})
    assert counts[0] != counts[1] and 16 in counts[0]  # 16 would also be specialized as divisible by 16
    assert keys[0] == keys[1]


def test_fp32_operands_get_their_own_tiles():
    """A model run in fp32: W4A16's fp32 main loop spilled 38 KB at 128×128×128, an fp32 T in the
    epilogue spilled at 128×128 on sm_80; each gets the tiles that stay spill-free."""
    launches = _plan(H100, _gemm("uint4_asym_groups", m=2048, n=4096, k=4096, dtype=torch.float32))
    assert [(c.block_m, c.block_n, c.block_k) for c in tuning.SM90_FP32_MAIN_CONFIGS] == \
        [(item.meta["BLOCK_M"], item.meta["BLOCK_N"], item.meta["BLOCK_K"]) for item in launches]
    fp32_t = dict(lowrank_t=torch.empty(2048, 136, device=META), lowrank_u=torch.empty(3072, 136, device=META))
    launches = _plan(A100, _gemm(m=2048, **fp32_t))
    assert {item.meta["BLOCK_R"] for item in launches} == {16}
    assert {(item.meta["BLOCK_M"], item.meta["BLOCK_N"]) for item in launches} == \
        {(c.block_m, c.block_n) for c in tuning.SM80_FP32_EPILOGUE_CONFIGS}


# ---------------------------------------------------------------- device guard


def test_every_launch_goes_through_the_device_guard():
    """Triton launches on the current device, not the tensors': the one launch helper guards with
    the input's device, and no other code in the backend launches a kernel."""
    backend = Path(launch.__file__).parent
    for path in backend.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("_kernel"):
                raise AssertionError(f"{path.name}:{node.lineno} launches {node.func.value.id} outside run_kernel")
    guard = kernel_launch._device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    entered = []
    with mock.patch.object(kernel_launch, "_device_guard", lambda device: entered.append(device) or mock.MagicMock()):
        a, scale = random_int8(3, 32)
        with qk.use_backend("triton"):
            ops.fused_linear(a, scale, random_weight("int8", 16, 32), requant_bits=8)
    assert entered == [torch.device("cpu")] * 2  # the GEMM and the requantization


# ---------------------------------------------------------------- autotuner


class _OutOfResources(Exception):
    pass


@pytest.fixture
def gpu_tuner(monkeypatch, tmp_path):
    """An autotuner as on a GPU (H100 target) whose launches are recorded, with a private cache."""
    monkeypatch.setenv("QLA_TUNING_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "_is_out_of_resources", lambda error: isinstance(error, _OutOfResources))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return tuning.Autotuner("test")


def _launcher(failing=()):
    calls = []

    def launch(config):
        calls.append(config)
        if config in failing:
            raise _OutOfResources()
    return calls, launch


@pytest.mark.parametrize("mode", ["autotune_off", "capture"])
def test_untimed_choice_falls_through_out_of_resources(gpu_tuner, monkeypatch, mode):
    candidates = tuning.SM90_GEMM_CONFIGS
    if mode == "autotune_off":
        monkeypatch.setenv("QLA_AUTOTUNE", "0")
    else:
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    calls, run = _launcher(failing=candidates[:2])
    with pytest.warns(UserWarning, match="CUDA-graph capture") if mode == "capture" else contextlib.nullcontext():
        chosen = gpu_tuner.run(("key",), H100, candidates, run)
    assert chosen == candidates[2] and calls == list(candidates[:3])
    calls.clear()
    chosen = gpu_tuner.run(("key",), H100, candidates, run)
    assert chosen == candidates[2]
    assert calls == ([candidates[2]] if mode == "autotune_off" else list(candidates[:3]))  # capture: not cached
    calls, run = _launcher(failing=candidates)
    with pytest.raises(RuntimeError, match="no configuration"):
        gpu_tuner.run(("other",), H100, candidates, run)


def test_tuning_skips_out_of_resources_and_is_cached_on_disk(gpu_tuner, monkeypatch, tmp_path):
    candidates = tuning.SM90_GEMM_CONFIGS
    timings = {candidates[0]: 3.0, candidates[1]: 1.0, candidates[2]: 2.0, candidates[3]: 0.5, candidates[4]: 4.0}
    import triton.testing

    def bench(fn, warmup, rep):
        fn()
        return timings[calls[-1]]
    monkeypatch.setattr(triton.testing, "do_bench", bench)
    calls, run = _launcher(failing=(candidates[3],))
    assert gpu_tuner.run(("shape", "fp16"), H100, candidates, run) == candidates[1]
    assert calls[-1] == candidates[1]  # the winner runs once more, so the output is its result
    files = list(tmp_path.glob("tuning-*.json"))
    assert len(files) == 1 and "NVIDIA_H100" in files[0].name
    fresh = tuning.Autotuner("test")  # another process: no timing
    calls.clear()
    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **k: pytest.fail("tuned again"))
    assert fresh.run(("shape", "fp16"), H100, candidates, run) == candidates[1] and calls == [candidates[1]]
    other_gpu = dataclasses.replace(H100, name="NVIDIA H200")
    with pytest.raises(pytest.fail.Exception):
        fresh.run(("shape", "fp16"), other_gpu, candidates, run)


def test_tuning_key_includes_operand_dtypes(monkeypatch):
    keys = []
    monkeypatch.setattr(launch._gemm_tuner, "run", lambda key, target, candidates, run: keys.append(key))
    weight = _meta_weight("int8", 64, 64)
    a, scale = torch.empty(32, 64, device=META, dtype=torch.int8), torch.empty(32, device=META)
    with planning(H100):
        for dtype in (torch.float16, torch.bfloat16):
            for t_dtype in (torch.float16, torch.float32):
                ops.fused_linear(a, scale, weight, out_dtype=dtype,
                                 residual=torch.empty(32, 64, device=META, dtype=dtype),
                                 lowrank_t=torch.empty(32, 16, device=META, dtype=t_dtype),
                                 lowrank_u=torch.empty(64, 16, device=META, dtype=t_dtype))
    assert len(set(keys)) == 4


# ---------------------------------------------------------------- row maps


def test_row_maps_are_checked_where_they_are_built():
    with pytest.raises(ValueError, match=r"indices\[2\] = 5 is outside \[-1, 5\)"):
        RowMap.build(torch.tensor([0, 1, 5]), 5)
    with pytest.raises(ValueError, match=r"indices\[0\] = -2"):
        RowMap.build(torch.tensor([-2]), 5)
    with pytest.raises(ValueError, match="repeat a row"):
        RowMap.build(torch.tensor([1, -1, 1]), 5)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        RowMap.build(torch.tensor([0.0]), 5)
    with pytest.raises(ValueError, match="rows must be"):
        RowMap.build(torch.tensor([0]), -1)
    batched = RowMap.build(torch.tensor([2, -1, 0]), 3).batched(2)
    assert batched.rows == 6 and batched.indices.tolist() == [2, -1, 0, 5, -1, 3]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_out_of_range_map_entries_never_leave_the_matrix(backend):
    """A map built without `RowMap.build` is trusted, yet no backend reads or writes outside the
    matrix: an out-of-range entry is padding (gather) or dropped (scatter), in every backend."""
    weight = random_weight("int8", 16, 32)
    a, scale = random_int8(4, 32)
    far = torch.tensor([0, 2**30, 3, -7], dtype=torch.int32)
    with qk.use_backend(backend):
        gathered = ops.fused_linear(a, scale, weight, gather_rows=RowMap(far, 4), out_dtype=torch.float32)
        scattered = ops.fused_linear(a, scale, weight, scatter_rows=RowMap(far, 4), out_rows=4, out_dtype=torch.float32)
    plain = ops.fused_linear(a, scale, weight, out_dtype=torch.float32)
    assert torch.equal(gathered[[0, 2]], plain[[0, 3]]) and not gathered[[1, 3]].any()
    assert torch.equal(scattered[[0, 3]], plain[[0, 2]]) and not scattered[[1, 2]].any()


# ---------------------------------------------------------------- 64-bit offsets

_OVERFLOW_SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from qla_kernels import ops
    from qla_kernels.ops import reference
    from qla_kernels.ops.triton import launch
    stride = 2**30  # row 2 starts at 2**31: a 32-bit row offset wraps to a negative one
    storage = torch.empty(2 * stride + 64, dtype=torch.int8)  # 2 GiB, untouched pages are not committed
    weight = storage.as_strided((3, 64), (stride, 1))
    generator = torch.Generator().manual_seed(0)
    weight.copy_(torch.randint(-127, 128, (3, 64), generator=generator, dtype=torch.int8))
    a = torch.randint(-127, 128, (2, 64), generator=generator, dtype=torch.int8)
    ones = torch.ones(3)
    y, _ = launch.fused_linear(ops.FusedLinearOperands(a, torch.ones(1), None, weight, "int8", ones, None, None, 64,
                                                       None, None, None, None, None, None, "none", None, torch.float32,
                                                       0, None, None, 2))
    expected = (a.double() @ weight.double().t()).float()
    print("EQUAL" if torch.equal(y, expected) else "DIFFERENT")
""")


def test_row_offsets_past_two_to_the_31_do_not_wrap():
    """A weight whose last row starts at 2**31 bytes (an LM head with N·K >= 2**31): run in the
    interpreter, which wraps int32 like the GPU does; before the fix the row read garbage or crashed."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", _OVERFLOW_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "EQUAL", (result.returncode, result.stderr[-2000:])


# ---------------------------------------------------------------- the CUDA module


@pytest.mark.parametrize("capability, runs", [((7, 5), False), ((8, 0), True), ((8, 6), True), ((8, 9), True),
                                              ((9, 0), True), ((10, 0), True), ((12, 0), True)])
def test_cuda_module_runs_only_where_it_was_built(capability, runs):
    assert cuda.runs_on(capability, "sm_80,sm_89,sm_90a", "compute_90") is runs
    assert cuda.runs_on(capability, "sm_90a", "") is (capability == (9, 0))
    assert not cuda.runs_on(capability, "", "")


def test_gated_decode_follows_the_reference_order(monkeypatch):
    """silu(gate)·up + residual in fp32 and one rounding at the end, as the reference does: the
    CUDA decode GEMM hands y over in fp32 (out_fp32), never rounded to fp16 first."""
    weight = quantize_weight(torch.randn(64, 256) * 0.05, qk.W4A16(group_size=128))
    a = torch.randn(2, 256).half()
    residual = torch.randn(2, 32).half() * 30  # large: fp16 rounding of y, then + residual, would differ
    calls = []

    def decode(a, weight_data, scale, zero, group, lowrank_t, lowrank_u, bias, residual, out_fp32=False):
        calls.append((residual is None, out_fp32))
        y, _ = reference.fused_linear(ops.FusedLinearOperands(
            a, None, None, weight_data, "uint4_asym_groups", scale, None, zero, group, None, lowrank_t, lowrank_u, None,
            None, bias, "none", residual, torch.float32 if out_fp32 else a.dtype, 0, None, None, a.shape[0]))
        return y

    with qk.use_backend("reference"):
        expected = ops.fused_linear(a, None, weight, activation="swiglu", residual=residual, out_dtype=torch.float16)
    monkeypatch.setattr(torch.ops.qla, "w4a16_decode_cuda", decode, raising=False)
    actual, _ = cuda.fused_linear(ops.FusedLinearOperands(
        a, None, None, weight.data, weight.format, weight.scale, None, weight.zero, weight.k_group, None, None, None,
        None, None, None, "swiglu", residual, torch.float16, 0, None, None, a.shape[0]))
    assert calls == [(True, True)]
    assert torch.equal(actual, expected)
