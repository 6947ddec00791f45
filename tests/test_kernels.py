"""moyu.kernels: both backends against a plain F.linear reference, and against each other."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moyu.errors import MoyuError
from moyu.kernels import (ACTIVATIONS, PackedMLP, backend_name, input_sparse_linear,
                          pack_linear, pack_mlp, sparse_mlp, sparse_mlp_threshold)
from moyu.kernels import _build, _torch_impl, ops

ROOT = Path(__file__).resolve().parents[1]
D, D_FF = 100, 200  # d not a multiple of 8 or 32: exercises the vector tails
ACT_REF = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
           "relu": F.relu}


def _load_cpp():
    if os.environ.get("MOYU_KERNELS", "").lower() == "torch":
        return None, "MOYU_KERNELS=torch forces the fallback"
    try:
        return _build.build_extension(), ""
    except Exception as exc:  # noqa: BLE001
        return None, f"C++ extension cannot build here: {_build._reason(exc)}"


_CPP, _CPP_SKIP = _load_cpp()
needs_cpp = pytest.mark.skipif(_CPP is None, reason=_CPP_SKIP or "no C++ extension")
BACKENDS = ["torch", pytest.param("cpp", marks=needs_cpp)]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine a 2-thread parallel region stalls
    whenever the other core is busy, which turns millisecond tests into seconds. The
    multi-chunk paths get their own test (test_multithreaded_chunks)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Routes the public functions to one backend for the duration of a test."""
    impl = _CPP if request.param == "cpp" else _torch_impl
    monkeypatch.setattr(ops, "_impl", impl)
    monkeypatch.setattr(ops, "_name", request.param)
    return request.param


def _tol(backend: str, dtype: torch.dtype) -> dict:
    # The torch fallback multiplies bf16 weights natively (x and activations rounded to
    # bf16); the C++ kernel widens bf16 weights and accumulates in fp32 like the reference.
    if backend == "torch" and dtype == torch.bfloat16:
        return {"atol": 4e-2, "rtol": 4e-2}
    return {"atol": 2e-5, "rtol": 1e-4}


class Mlp:
    """Random MLP weights (rounded to the storage dtype) plus its dense reference."""

    def __init__(self, act: str, gated: bool, bias: bool, dtype: torch.dtype, seed: int = 0,
                 d: int = D, d_ff: int = D_FF):
        g = torch.Generator().manual_seed(seed)

        def rnd(*shape, scale):
            return (torch.randn(*shape, generator=g) * scale).to(dtype).float()

        self.act, self.dtype = act, dtype
        self.w_up = rnd(d_ff, d, scale=d ** -0.5)
        self.w_gate = rnd(d_ff, d, scale=d ** -0.5) if gated else None
        self.w_down = rnd(d, d_ff, scale=d_ff ** -0.5)
        self.b_up = rnd(d_ff, scale=0.1) if bias else None
        self.b_gate = rnd(d_ff, scale=0.1) if bias and gated else None
        self.b_down = rnd(d, scale=0.1) if bias else None

    def pack(self) -> PackedMLP:
        return pack_mlp(self.w_up, self.w_down, self.act, w_gate=self.w_gate, b_up=self.b_up,
                        b_gate=self.b_gate, b_down=self.b_down, fmt=self.dtype)

    def gate_act(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w_gate if self.w_gate is not None else self.w_up
        b = self.b_gate if self.w_gate is not None else self.b_up
        return ACT_REF[self.act](F.linear(x, w, b))

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """a_i for every neuron: act(g) * u (gated) or act(u) (plain)."""
        if self.w_gate is None:
            return self.gate_act(x)
        return self.gate_act(x) * F.linear(x, self.w_up, self.b_up)

    def reference(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        a = self.coefficients(x)
        if mask is not None:
            a = a * mask
        return F.linear(a, self.w_down, self.b_down)


def _mask_of(idx: torch.Tensor | None, d_ff: int = D_FF) -> torch.Tensor:
    mask = torch.zeros(d_ff)
    if idx is None:
        return mask + 1
    return mask.index_add_(0, idx.long(), torch.ones(idx.numel()))


def _index_cases(d_ff: int = D_FF) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)
    return {
        "none": None,
        "empty": torch.empty(0, dtype=torch.long),
        "full": torch.arange(d_ff),
        "subset_sorted": torch.randperm(d_ff, generator=g)[: d_ff // 3].sort().values,
        "subset_unsorted": torch.randperm(d_ff, generator=g)[: d_ff // 2],
        "int32": torch.randperm(d_ff, generator=g)[:40].to(torch.int32),
        "run": torch.arange(30, 90),
        "duplicates": torch.tensor([5, 7, 5, d_ff - 1, 0]),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_sparse_mlp_matches_reference(backend, act, gated, bias, dtype):
    mlp = Mlp(act, gated, bias, dtype)
    packed = mlp.pack()
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(2))
    for name, idx in _index_cases().items():
        ref = mlp.reference(x, _mask_of(idx))
        torch.testing.assert_close(sparse_mlp(x, packed, idx), ref, **_tol(backend, dtype),
                            msg=lambda m, name=name: f"idx={name}: {m}")
        torch.testing.assert_close(sparse_mlp(x[1], packed, idx), ref[1], **_tol(backend, dtype),
                            msg=lambda m, name=name: f"idx={name}, 1-D x: {m}")


def test_empty_idx_returns_bias_or_zeros(backend):
    empty = torch.empty(0, dtype=torch.long)
    mlp = Mlp("silu", True, True, torch.float32)
    x = torch.randn(D)
    assert torch.equal(sparse_mlp(x, mlp.pack(), empty), mlp.b_down)
    plain = Mlp("relu", False, False, torch.float32)
    assert torch.equal(sparse_mlp(x, plain.pack(), empty), torch.zeros(D))


def test_dense_mlp_and_shapes(backend):
    mlp = Mlp("gelu", True, True, torch.float32)
    packed = mlp.pack()
    x = torch.randn(11, D)  # more rows than the kernel handles per pass
    ref = mlp.reference(x)
    torch.testing.assert_close(sparse_mlp(x, packed, None), ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(sparse_mlp(x[:1], packed), ref[:1], atol=2e-5, rtol=1e-4)
    assert sparse_mlp(x[0], packed).shape == (D,)
    assert sparse_mlp(x[0], packed).dtype == torch.float32


@needs_cpp
def test_multithreaded_chunks(monkeypatch):
    """Several chunks with per-thread partial sums give the single-thread result."""
    monkeypatch.setattr(ops, "_impl", _CPP)
    mlp = Mlp("silu", True, True, torch.float32, d=256, d_ff=1024)
    packed = mlp.pack()
    x = torch.randn(2, 256)
    idx = torch.randperm(1024)[:700]
    lin = pack_linear(torch.randn(300, 256), torch.randn(300))
    torch.set_num_threads(1)
    single = (sparse_mlp(x, packed, idx), sparse_mlp_threshold(x, packed, 0.1),
              input_sparse_linear(x, lin, tau=0.5))
    torch.set_num_threads(2)
    multi = (sparse_mlp(x, packed, idx), sparse_mlp_threshold(x, packed, 0.1),
             input_sparse_linear(x, lin, tau=0.5))
    torch.testing.assert_close(multi[0], single[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(multi[1][0], single[1][0], atol=1e-5, rtol=1e-5)
    assert multi[1][1] == single[1][1]
    torch.testing.assert_close(multi[2], single[2], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(multi[0], mlp.reference(x, _mask_of(idx, 1024)),
                               atol=2e-5, rtol=1e-4)


def test_out_is_reused(backend):
    mlp = Mlp("silu", True, False, torch.float32)
    packed = mlp.pack()
    x = torch.randn(D)
    out = torch.empty(D)
    idx = torch.arange(0, D_FF, 3)
    y = sparse_mlp(x, packed, idx, out=out)
    assert y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, mlp.reference(x, _mask_of(idx)), atol=2e-5, rtol=1e-4)
    lin = pack_linear(torch.randn(50, D))
    out2 = torch.empty(50)
    assert input_sparse_linear(x, lin, out=out2).data_ptr() == out2.data_ptr()


def test_out_of_range_idx_raises(backend):
    packed = Mlp("silu", True, False, torch.float32).pack()
    with pytest.raises((IndexError, RuntimeError)):
        sparse_mlp(torch.randn(D), packed, torch.tensor([0, D_FF]))
    with pytest.raises((IndexError, RuntimeError)):
        sparse_mlp(torch.randn(D), packed, torch.tensor([-1]))


def _separate_threshold(mlp: Mlp, x: torch.Tensor, mode: str) -> float:
    """Picks tau near the median score and zeroes the neurons whose score is within a
    margin of it, so backends with different rounding agree on every keep decision."""
    by_gate = mode == "gate" and mlp.w_gate is not None
    score = (mlp.gate_act(x) if by_gate else mlp.coefficients(x)).abs().reshape(-1, D_FF)
    tau = float(score.median())
    near = ((score - tau).abs() < 0.05 * tau + 2e-3).any(0)
    if by_gate or mlp.w_gate is None:  # act(0) == 0 for every supported activation
        target, bias = (mlp.w_gate, mlp.b_gate) if by_gate else (mlp.w_up, mlp.b_up)
    else:  # gated, full-activation mode: zero u instead
        target, bias = mlp.w_up, mlp.b_up
    target[near] = 0
    if bias is not None:
        bias[near] = 0
    return tau


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["gate", "act"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_threshold_matches_masked_reference(backend, act, gated, mode, dtype):
    mlp = Mlp(act, gated, True, dtype, seed=3)
    for x in (torch.randn(D, generator=torch.Generator().manual_seed(4)),
              torch.randn(3, D, generator=torch.Generator().manual_seed(5))):
        tau = _separate_threshold(mlp, x, mode)
        packed = mlp.pack()
        score = mlp.gate_act(x) if (mode == "gate" and gated) else mlp.coefficients(x)
        mask = (score.abs() > tau).float()
        y, n_kept = sparse_mlp_threshold(x, packed, tau, mode)
        torch.testing.assert_close(y, mlp.reference(x, mask), **_tol(backend, dtype))
        assert n_kept == int(mask.reshape(-1, D_FF).amax(0).sum())
        assert 0 < n_kept < D_FF


def test_threshold_extremes(backend):
    mlp = Mlp("silu", True, True, torch.float32)
    packed = mlp.pack()
    x = torch.randn(D)
    y, n = sparse_mlp_threshold(x, packed, -1.0)
    assert n == D_FF
    torch.testing.assert_close(y, mlp.reference(x), atol=2e-5, rtol=1e-4)
    y, n = sparse_mlp_threshold(x, packed, float("inf"))
    assert n == 0
    assert torch.equal(y, mlp.b_down)
    with pytest.raises(ValueError):
        sparse_mlp_threshold(x, packed, 0.1, mode="nope")


def _separated_input(n: int, d_in: int, tau: float, seed: int) -> torch.Tensor:
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed))
    x[((x.abs() - tau).abs() < 0.05)] = 0.0
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_input_sparse_linear(backend, bias, dtype):
    d_in, d_out = 150, 70
    g = torch.Generator().manual_seed(6)
    w = (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).to(dtype).float()
    b = torch.randn(d_out, generator=g) if bias else None
    packed = pack_linear(w, b, fmt=dtype)
    tol = _tol(backend, dtype)
    x = _separated_input(3, d_in, 0.7, seed=7)
    for name, idx in _index_cases(d_in).items():
        ref = F.linear(x * _mask_of(idx, d_in), w, b)
        torch.testing.assert_close(input_sparse_linear(x, packed, idx), ref, **tol,
                                   msg=lambda m, name=name: f"idx={name}: {m}")
        torch.testing.assert_close(input_sparse_linear(x[0], packed, idx), ref[0], **tol)
    for tau in (0.7, 0.0, 10.0):
        ref = F.linear(x * (x.abs() > tau), w, b)
        torch.testing.assert_close(input_sparse_linear(x, packed, tau=tau), ref, **tol)
        torch.testing.assert_close(input_sparse_linear(x[2], packed, tau=tau), ref[2], **tol)
    # idx wins over tau
    idx = torch.tensor([3, 1, 4])
    torch.testing.assert_close(input_sparse_linear(x, packed, idx, tau=100.0),
                               F.linear(x * _mask_of(idx, d_in), w, b), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_slice_equals_idx(backend, dtype):
    mlp = Mlp("silu", True, True, dtype)
    packed = mlp.pack()
    idx = torch.randperm(D_FF, generator=torch.Generator().manual_seed(8))[:70]
    part = packed.slice(idx)
    assert part.d_ff == 70 and part.d == D and part.gated and part.act == "silu"
    assert torch.equal(part.neurons, idx)
    assert part.nbytes < packed.nbytes
    x = torch.randn(2, D)
    torch.testing.assert_close(sparse_mlp(x, part), sparse_mlp(x, packed, idx),
                               atol=1e-5, rtol=1e-5)
    sub = torch.tensor([4, 0, 9])
    assert torch.equal(part.slice(sub).neurons, idx[sub])
    torch.testing.assert_close(sparse_mlp(x, part.slice(sub)), sparse_mlp(x, packed, idx[sub]),
                               atol=1e-5, rtol=1e-5)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backends_agree(dtype, monkeypatch):
    mlp = Mlp("gelu_tanh", True, True, dtype, seed=9, d=576, d_ff=1536)
    packed = mlp.pack()
    x = torch.randn(576)
    idx = torch.randperm(1536)[:600]
    lin = pack_linear(torch.randn(300, 576) / 24, torch.randn(300), fmt=dtype)
    results = {}
    for name, impl in (("torch", _torch_impl), ("cpp", _CPP)):
        monkeypatch.setattr(ops, "_impl", impl)
        results[name] = (sparse_mlp(x, packed, idx), sparse_mlp(x, packed, None),
                         input_sparse_linear(x, lin, idx[idx < 576]),
                         input_sparse_linear(x, lin, tau=0.8))
    for got, want in zip(results["cpp"], results["torch"]):
        torch.testing.assert_close(got, want, **_tol("torch", dtype))


def _sketch(mlp: Mlp, packed: PackedMLP):
    """int8 per-row sketch of packed w_in, in the layout the sketch kernels take."""
    from moyu.methods.sketch import quantize_rows
    d_ff, r, d = packed.w_in.shape
    codes, scales = quantize_rows(packed.w_in.float().reshape(d_ff * r, d))
    return codes.reshape(d_ff, r, d), scales.reshape(d_ff, r).contiguous(), packed.b_in


def _sketch_reference(mlp: Mlp, codes, scales, bias, x):
    w = codes.float() * scales[..., None]                       # [d_ff, r, d]
    pre = torch.einsum("frd,d->fr", w, x) + (0 if bias is None else bias)
    act = ACT_REF[mlp.act](pre[:, 0])
    return act * pre[:, 1] if pre.shape[1] == 2 else act


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_sketch_kernels(backend, act, gated, bias, dtype):
    from moyu.kernels import sketch_act, sketch_mlp
    mlp = Mlp(act, gated, bias, dtype, seed=3)
    packed = mlp.pack()
    codes, scales, b = _sketch(mlp, packed)
    down_norm = mlp.w_down.norm(dim=0).contiguous()
    xs = torch.randn(3, D)
    est = sketch_act(xs, codes, scales, b, packed.act_id)
    for q in range(3):
        torch.testing.assert_close(est[q], _sketch_reference(mlp, codes, scales, b, xs[q]),
                                   atol=1e-4, rtol=1e-4)
    score = est[0].abs() * down_norm
    srt = score.sort().values
    half = float(srt[D_FF // 2 - 1] + srt[D_FF // 2]) / 2   # between two scores: no ties
    for tau in (-1.0, half, float(score.max()) + 1):   # all, half, none kept
        keep = score > tau
        for reuse in (False, True):
            y, kept = sketch_mlp(xs[0], codes, scales, b, down_norm, tau, packed, reuse)
            assert kept == int(keep.sum())                 # same selection as sketch_act
            if reuse:
                want = F.linear(est[0] * keep, mlp.w_down, mlp.b_down)
            else:
                want = mlp.reference(xs[0], keep.float())
            torch.testing.assert_close(y, want, **_tol(backend, dtype))


@needs_cpp
def test_sketch_backends_agree(monkeypatch):
    from moyu.kernels import sketch_act
    mlp = Mlp("silu", True, False, torch.float32, seed=4, d=576, d_ff=1536)
    packed = mlp.pack()
    codes, scales, b = _sketch(mlp, packed)
    x = torch.randn(5, 576)
    got = {}
    for name, impl in (("torch", _torch_impl), ("cpp", _CPP)):
        monkeypatch.setattr(ops, "_impl", impl)
        got[name] = sketch_act(x, codes, scales, b, packed.act_id)
    torch.testing.assert_close(got["cpp"], got["torch"], atol=1e-4, rtol=1e-4)


def test_pack_layout_and_validation():
    mlp = Mlp("silu", True, True, torch.float32)
    p = mlp.pack()
    assert p.w_in.shape == (D_FF, 2, D) and p.w_in.is_contiguous()
    assert torch.equal(p.w_in[7, 0], mlp.w_gate[7]) and torch.equal(p.w_in[7, 1], mlp.w_up[7])
    assert torch.equal(p.w_down_t[7], mlp.w_down[:, 7])
    assert p.b_in.shape == (D_FF, 2) and p.b_down.dtype == torch.float32
    assert p.nbytes == (3 * D_FF * D + 2 * D_FF + D) * 4
    assert mlp.pack().slice(torch.arange(D_FF)).w_in.shape == p.w_in.shape
    bf = pack_mlp(mlp.w_up, mlp.w_down, "relu", fmt=torch.bfloat16)
    assert not bf.gated and bf.w_in.shape == (D_FF, 1, D) and bf.w_in.dtype == torch.bfloat16 and bf.fmt.name == "bf16"
    assert bf.b_in is None and bf.b_down is None
    lin = pack_linear(mlp.w_up, mlp.b_up)
    assert lin.wt.shape == (D, D_FF) and lin.in_features == D and lin.out_features == D_FF
    with pytest.raises(ValueError):
        pack_mlp(mlp.w_up, mlp.w_down, "tanh")
    with pytest.raises(ValueError):
        pack_mlp(mlp.w_up, mlp.w_down.t(), "silu")
    with pytest.raises(MoyuError, match="fp32"):
        pack_mlp(mlp.w_up, mlp.w_down, "silu", fmt=torch.float16)
    with pytest.raises(IndexError):
        p.slice(torch.tensor([D_FF]))


def test_backend_name():
    assert backend_name() in ("cpp", "torch")
    if _CPP is not None:
        assert backend_name() == "cpp" or os.environ.get("MOYU_KERNELS", "") == "torch"


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)


_PROBE = """
    import torch
    from moyu.kernels import backend_name, pack_mlp, sparse_mlp
    p = pack_mlp(torch.randn(16, 8), torch.randn(8, 16), "silu", w_gate=torch.randn(16, 8))
    y = sparse_mlp(torch.randn(8), p, torch.tensor([1, 2]))
    y = sparse_mlp(torch.randn(8), p, torch.tensor([3]))
    print(backend_name(), tuple(y.shape))
"""


def test_failed_build_warns_once_and_falls_back(tmp_path):
    res = _run(_PROBE, MOYU_CACHE=str(tmp_path), MOYU_KERNELS="auto", CXX="/bin/false")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["torch", "(8,)"]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("moyu: warning: sparse kernel build failed (")
    assert lines[0].endswith("using the PyTorch fallback")


@pytest.mark.slow   # seconds of end-to-end work: the full suite runs it
def test_env_forces_backend(tmp_path):
    res = _run(_PROBE, MOYU_KERNELS="torch")
    assert res.returncode == 0 and res.stdout.split()[0] == "torch" and not res.stderr.strip()
    res = _run(_PROBE, MOYU_CACHE=str(tmp_path), MOYU_KERNELS="cpp", CXX="/bin/false")
    assert res.returncode != 0 and "MOYU_KERNELS=cpp" in res.stderr


@needs_cpp
def test_cached_build_is_quiet_and_survives_stale_lock():
    name = _build.extension_name()
    build_dir = _build.cache_dir() / name
    # what a build killed mid-way leaves behind; made under the build lock so that no other
    # process is inside a build of this cache right now (it would wait on the fake baton)
    with _build._exclusive(build_dir.parent / f"{name}.flock"):
        (build_dir / "lock").touch()
    res = _run(_PROBE, MOYU_KERNELS="cpp")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == "cpp" and res.stderr == ""


def test_untrusted_library_is_detected(tmp_path):
    """A library no load has recorded (e.g. half-written by a killed link) is not trusted."""
    assert _build._trusted(tmp_path)  # nothing built yet
    so = tmp_path / "moyu_sparse_x.so"
    so.write_bytes(b"\x7fELF")
    assert not _build._trusted(tmp_path)
    fake = type(sys)("moyu_sparse_x")
    fake.__file__ = str(so)
    _build._record(tmp_path, fake)
    assert _build._trusted(tmp_path)
    so.write_bytes(b"\x7fELF truncated differently")
    assert not _build._trusted(tmp_path)


@pytest.mark.parametrize("shape", [(576,), (7, 64), (3, 4, 33)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_matches_torch(backend, shape, with_weight):
    from moyu.kernels import rms_norm
    x = torch.randn(*shape) * 5
    w = torch.randn(shape[-1]) if with_weight else None
    torch.testing.assert_close(rms_norm(x, w, 1e-6), F.rms_norm(x, (shape[-1],), w, 1e-6),
                               atol=1e-5, rtol=1e-5)


def _attn_reference(q, k, v, k_hist, v_hist, cos, sin, scale, softcap):
    """Naive per-head loop: rotate q and k, append k/v to the history, softmax(q.K) V."""
    def rot(x):
        if cos is None:
            return x.clone()
        half, y = cos.numel(), x.clone()
        x1, x2 = x[..., :half], x[..., half:2 * half]
        y[..., :half], y[..., half:2 * half] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        return y
    n_kv, hd = k_hist.shape[0], k_hist.shape[2]
    heads = q.numel() // hd
    qh, kh = rot(q.view(heads, hd)), rot(k.view(n_kv, hd))
    keys = torch.cat([k_hist, kh[:, None]], 1)
    vals = torch.cat([v_hist, v.view(n_kv, 1, hd)], 1)
    outs = []
    for h in range(heads):
        j = h // (heads // n_kv)
        s = keys[j] @ (qh[h] * scale)
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        outs.append(torch.softmax(s, 0) @ vals[j])
    return torch.cat(outs), kh


@pytest.mark.parametrize("heads,n_kv,hd,half,lo,softcap", [
    (9, 3, 64, 32, 0, 0.0),    # SmolLM2: GQA, full rotary
    (4, 1, 32, 8, 3, 50.0),    # partial rotary, sliding window, softcapped scores
    (2, 2, 16, 0, 0, 0.0),     # no rotary (learned positions), one position only at pos 0
])
def test_attn_decode_matches_reference(backend, heads, n_kv, hd, half, lo, softcap):
    from moyu.kernels import attn_decode
    torch.manual_seed(3)
    S, pos = 12, 7 if half or lo else 0
    kc, vc = torch.randn(n_kv, S, hd), torch.randn(n_kv, S, hd)
    k_hist, v_hist = kc[:, lo:pos].clone(), vc[:, lo:pos].clone()
    q, k, v = torch.randn(heads * hd), torch.randn(n_kv * hd), torch.randn(n_kv * hd)
    ang = torch.rand(half) * 6
    cos, sin = (ang.cos(), ang.sin()) if half else (None, None)
    q0, k0 = q.clone(), k.clone()
    out = attn_decode(q, k, v, kc, vc, pos, lo, cos, sin, hd ** -0.5, softcap)
    want, k_rot = _attn_reference(q, k, v, k_hist, v_hist, cos, sin, hd ** -0.5, softcap)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc[:, pos], k_rot, atol=1e-6, rtol=1e-6)   # cache row written
    torch.testing.assert_close(vc[:, pos], v.view(n_kv, hd))
    assert torch.equal(q, q0) and torch.equal(k, k0)                      # inputs untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_matvec_matches_linear(backend, dtype):
    """The row-major matvec of a float lm_head equals F.linear on the widened weights, with
    a bias, into a given output, and refuses a batch."""
    from moyu.kernels import rows_matvec
    torch.manual_seed(5)
    w, x, b = torch.randn(203, 70).to(dtype), torch.randn(70), torch.randn(203)
    want = torch.nn.functional.linear(x, w.float(), b)
    out = torch.empty(203)
    got = rows_matvec(x, w, b, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows_matvec(x, w), want - b, atol=1e-5, rtol=1e-5)
    if backend == "cpp":
        with pytest.raises(RuntimeError, match="one position"):
            rows_matvec(torch.randn(2, 70), w)


def test_attn_decode_heads_split_over_threads_give_the_same_bits(backend):
    """Past 2^15 heads x positions x head_dim the heads are split over threads; each head's
    arithmetic is unchanged, so the result equals the one-thread result bit for bit."""
    from moyu.kernels import attn_decode
    torch.manual_seed(4)
    heads, n_kv, hd, S, pos = 9, 3, 64, 200, 150
    base = (torch.randn(heads * hd), torch.randn(n_kv * hd), torch.randn(n_kv * hd))
    caches = torch.randn(n_kv, S, hd), torch.randn(n_kv, S, hd)
    ang = torch.rand(hd // 2) * 6
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            kc, vc = caches[0].clone(), caches[1].clone()
            outs.append(attn_decode(*base, kc, vc, pos, 0, ang.cos(), ang.sin(), hd ** -0.5))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    want, _ = _attn_reference(*base, caches[0][:, :pos], caches[1][:, :pos], ang.cos(), ang.sin(), hd ** -0.5, 0.0)
    torch.testing.assert_close(outs[0], want, atol=1e-5, rtol=1e-5)


def test_attn_decode_rejects_bad_shapes(backend):
    from moyu.kernels import attn_decode
    kc = torch.zeros(2, 4, 8)
    with pytest.raises((RuntimeError, ValueError)):
        attn_decode(torch.zeros(16), torch.zeros(16), torch.zeros(16), kc, kc.clone(), 4, 0,
                    None, None, 1.0)  # pos beyond the cache
