"""verl's hot path on rlhf_fast (rlhf_fast.integrations.verl.register()), single process, against verl 0.9.1's own
functions as oracles: values, gradients, output dtypes and shapes, inputs left untouched; the FSDP and Megatron
engine methods that ask for entropy and log-probs of the same logits, against verl's own methods, with one rf row
pass; restoration by unregister(), also in a verl module imported after register().
The tensor-parallel swaps run in tests/test_integrations_verl_tp.py."""
import importlib
import inspect
import sys
import types
import warnings

import pytest
import torch

tf = pytest.importorskip("verl.utils.torch_functional",
                         reason="verl is not installed (pip install verl==0.9.1 --no-deps)")
etf = importlib.import_module("verl.utils.experimental.torch_functional")
lce = importlib.import_module("verl.utils.kernel.linear_cross_entropy")

from rlhf_fast.integrations import verl as rf_verl  # noqa: E402

from utils import assert_rel  # noqa: E402

VERL = {n: getattr(tf, n) for n in ("logprobs_from_logits", "entropy_from_logits", "entropy_from_logits_with_chunking")}
VERL_FUSED_LINEAR = etf.FusedLinearForPPO
VERL_LCE = lce.linear_cross_entropy


def _fsdp():
    try:
        return importlib.import_module("verl.workers.engine.fsdp.transformer_impl")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"verl's FSDP engine does not import here: {e}")


def _megatron():
    try:
        return importlib.import_module("verl.workers.engine.megatron.transformer_impl")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"verl's Megatron engine does not import here (megatron-core==0.16.1 --no-deps): {e}")


@pytest.fixture
def hot():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rf_verl.register()
    rf_verl.calls.clear()
    yield rf_verl.calls
    rf_verl.unregister()
    for n, f in VERL.items():
        assert getattr(tf, n) is f, n
    assert etf.FusedLinearForPPO is VERL_FUSED_LINEAR and lce.linear_cross_entropy is VERL_LCE


def _logits(shape, dtype, seed=0, sliced=False):
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(*shape[:-2], shape[-2] + int(sliced), shape[-1], generator=g, dtype=torch.float64)
    x[..., 0, 5] = 40.0  # one peaked row
    x = x.to(dtype)
    return x[..., :-1, :] if sliced else x


# ----------------------------------------------------------------------------- signatures
def _params(fn, drop_first=False):
    ps = list(inspect.signature(fn).parameters.values())[int(drop_first):]
    return [(p.name, p.default, p.kind) for p in ps]


def test_signatures_are_verls():
    """Argument names, order, defaults and kinds of every swapped function are verl's."""
    vtp = pytest.importorskip("verl.utils.megatron.tensor_parallel")
    for name, fn in VERL.items():
        assert _params(getattr(rf_verl, name)) == _params(fn), name
    for name in ("vocab_parallel_entropy", "vocab_parallel_entropy_with_chunking",
                 "vocab_parallel_log_probs_from_logits"):
        assert _params(getattr(rf_verl, name)) == _params(getattr(vtp, name)), name
    assert _params(rf_verl.linear_cross_entropy) == _params(lce.LinearCrossEntropy.forward, drop_first=True)
    rf_cls = rf_verl._make_fused_linear_for_ppo(VERL_FUSED_LINEAR)
    assert _params(rf_cls.forward) == _params(VERL_FUSED_LINEAR.forward)
    assert _params(rf_cls.__init__) == _params(VERL_FUSED_LINEAR.__init__)


# ----------------------------------------------------------------------------- torch_functional
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float64, 1e-12)])
@pytest.mark.parametrize("sliced", [False, True])
def test_logprobs_and_entropy_from_logits_match_verl(hot, dtype, tol, sliced):
    V = 301  # not a multiple of any block
    leaf = _logits((3, 5, V), dtype, sliced=sliced).requires_grad_()
    labels = torch.randint(0, V, (3, 5))
    labels[0, 0] = 5
    for name in ("logprobs_from_logits", "entropy_from_logits"):
        args = (labels,) if name == "logprobs_from_logits" else ()
        before = leaf.detach().clone()
        out = getattr(tf, name)(leaf, *args)
        exp = VERL[name](leaf.detach().clone(), *args)  # verl's on the same input: its dtype and shape
        assert out.dtype == exp.dtype and out.shape == exp.shape, name
        # values and gradient against verl's own function in float64
        x64 = leaf.detach().double().requires_grad_()
        ref = VERL[name](x64, *args)
        w = torch.randn(out.shape, dtype=torch.float64)
        (out.double() * w).sum().backward()
        (ref * w).sum().backward()
        assert_rel(out, ref, tol, name)
        assert_rel(leaf.grad, x64.grad, tol, name + " grad")
        assert leaf.grad.dtype == dtype
        assert torch.equal(leaf.detach(), before), f"{name} changed its input"
        leaf.grad = None
    assert hot["logprobs_from_logits"] == 1 and hot["entropy_from_logits"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_with_chunking_matches_verl(hot, dtype):
    x = _logits((11, 97), dtype).requires_grad_()
    out = tf.entropy_from_logits_with_chunking(x, chunk_size=4)
    exp = VERL["entropy_from_logits_with_chunking"](x.detach(), chunk_size=4)
    assert out.dtype == exp.dtype == torch.float32 and out.shape == exp.shape
    x64 = x.detach().double().requires_grad_()
    ref = VERL["entropy_from_logits"](x64)
    out.sum().backward()
    ref.sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_rel(out, ref, 1e-5 if dtype == torch.float32 else 1e-6, "entropy")  # fp32 math on the same inputs
    assert_rel(x.grad, x64.grad, tol, "entropy grad")
    assert hot["entropy_from_logits_with_chunking"] == 1


def test_edge_rows(hot):
    """A length-1 sequence, a row with a -inf column (verl's own entropy gives NaN there: rf gives the entropy
    of the other columns, which is what the distribution has), huge logits."""
    x = torch.randn(1, 1, 50, dtype=torch.float64)
    y = torch.tensor([[7]])
    assert_rel(tf.logprobs_from_logits(x, y), VERL["logprobs_from_logits"](x, y), 1e-12, "length 1")
    x = torch.randn(4, 50, dtype=torch.float64)
    x[0, 3] = float("-inf")
    x[1] *= 1e4
    ent = tf.entropy_from_logits(x)
    finite = x.clone()
    finite[0, 3] = -1e300  # the same distribution without the -inf
    assert_rel(ent, VERL["entropy_from_logits"](finite), 1e-9, "edge entropy")


def test_labels_out_of_range_name_the_argument(hot):
    with pytest.raises(ValueError, match="labels"):
        tf.logprobs_from_logits(torch.randn(3, 10), torch.tensor([0, 10, 1]))


# ----------------------------------------------------------------------------- the fused linear paths
def _hidden(shape, V, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, generator=g).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(V, shape[-1], generator=g)).to(dtype).requires_grad_()
    ids = torch.randint(0, V, shape[:-1], generator=g)
    return h, w, ids


@pytest.mark.parametrize("shape", [(2, 5, 16), (9, 16)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_linear_for_ppo_matches_verl(hot, shape, dtype, tol):
    h, w, ids = _hidden(shape, 203, dtype)
    h0, w0 = h.detach().clone(), w.detach().clone()
    mod = etf.FusedLinearForPPO()
    assert isinstance(mod, VERL_FUSED_LINEAR)
    logp, ent = mod(h, w, ids, 0.7)
    # verl's torch backend is the oracle (fp32 math inside, as rf's)
    hr, wr = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    elogp, eent = VERL_FUSED_LINEAR()(hr, wr, ids, 0.7)
    vlogp, vent = VERL_FUSED_LINEAR()(h.detach(), w.detach(), ids, 0.7)  # dtypes and shapes of verl's, same input
    assert (logp.dtype, ent.dtype, logp.shape, ent.shape) == (vlogp.dtype, vent.dtype, vlogp.shape, vent.shape)
    a, b = torch.randn(logp.shape), torch.randn(ent.shape)
    (logp.float() * a + ent.float() * b).sum().backward()
    (elogp * a + eent * b).sum().backward()
    assert_rel(logp, elogp, tol, "log_probs")
    assert_rel(ent, eent, tol, "entropy")
    assert_rel(h.grad, hr.grad, tol, "grad hidden")
    assert_rel(w.grad, wr.grad, tol, "grad weight")
    assert h.grad.dtype == w.grad.dtype == dtype
    assert torch.equal(h.detach(), h0) and torch.equal(w.detach(), w0), "inputs changed"
    assert hot["FusedLinearForPPO"] == 1


def test_fused_linear_for_ppo_liger_backend_stays_verls(hot):
    """impl_backend="liger" is verl's Liger path, untouched (rf replaces the "torch" backend only)."""
    if etf._LIGER_FUSED_LINEAR_SCALED_CROSS_ENTROPY is None:
        pytest.skip("liger-kernel not installed")
    h, w, ids = _hidden((4, 16), 40, torch.float32)
    out = etf.FusedLinearForPPO(impl_backend="liger")(h, w, ids, 1.0)
    exp = VERL_FUSED_LINEAR(impl_backend="liger")(h, w, ids, 1.0)
    assert hot["FusedLinearForPPO(verl liger)"] == 1 and hot["FusedLinearForPPO"] == 0
    for o, e in zip(out, exp):
        assert torch.equal(o, e)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_linear_cross_entropy_matches_verl_math(hot, reduction):
    """verl's linear_cross_entropy kernel is CUDA-only; its math is FusedLinearForPPO's (verl's own, the oracle),
    with flat [N] outputs, log-probs reduced by ``reduction``."""
    h, w, ids = _hidden((2, 4, 24), 150, torch.float32)
    h0, w0 = h.detach().clone(), w.detach().clone()
    logp, ent = lce.linear_cross_entropy(h, w, ids, 0.9, reduction)
    hr, wr = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    elogp, eent = VERL_FUSED_LINEAR()(hr.view(-1, 24), wr, ids.view(-1), 0.9)
    elogp = {"none": elogp, "sum": elogp.sum(), "mean": elogp.mean()}[reduction]
    assert logp.shape == elogp.shape and ent.shape == (8,) and logp.dtype == ent.dtype == torch.float32
    a = torch.randn(logp.shape)
    b = torch.randn(8)
    ((logp * a).sum() + (ent * b).sum()).backward()
    ((elogp * a).sum() + (eent * b).sum()).backward()
    assert_rel(logp, elogp, 1e-5, "log_probs")
    assert_rel(ent, eent, 1e-5, "entropy")
    assert h.grad.shape == h.shape
    assert_rel(h.grad.view(-1, 24), hr.grad.view(-1, 24), 1e-5, "grad hidden")
    assert_rel(w.grad, wr.grad, 1e-5, "grad weight")
    assert torch.equal(h.detach(), h0) and torch.equal(w.detach(), w0), "inputs changed"
    assert hot["linear_cross_entropy"] == 1
    with pytest.raises(ValueError, match="reduction"):
        lce.linear_cross_entropy(h, w, ids, 0.9, "avg")


# ----------------------------------------------------------------------------- the FSDP engine's double pass
def _fsdp_call(mod, method, logits, labels, chunked, calc_entropy=True, compiled=False):
    """FSDPEngineWithLMHead.prepare_model_outputs on a remove-padding micro batch (2 sequences, 4 + 3 tokens)."""
    eng = object.__new__(mod.FSDPEngineWithLMHead)
    eng.engine_config = types.SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=chunked,
                                              entropy_from_logits_chunk_size=3)
    eng.use_ulysses_sp = False
    # an engine built before register(): it holds verl's own entropy function
    fn = VERL["entropy_from_logits_with_chunking" if chunked else "entropy_from_logits"]
    eng.compute_entropy_from_logits = torch.compile(fn, dynamic=True) if compiled else fn  # verl's use_torch_compile
    offsets = torch.tensor([0, 4, 7])
    micro_batch = {"input_ids": torch.nested.nested_tensor_from_jagged(labels, offsets),
                   "calculate_entropy": calc_entropy, "use_remove_padding": True}
    output = types.SimpleNamespace(logits=logits.unsqueeze(0))
    output_args = {"input_ids_rmpad_rolled": labels, "temperature_rmpad": torch.ones(7), "temperature_is_one": True,
                   "pad_size": 0}
    return method(eng, output, output_args, micro_batch, None)


@pytest.mark.parametrize("chunked,compiled", [(False, False), (True, False), (False, True)])
def test_fsdp_engine_one_pass_matches_verl(hot, monkeypatch, chunked, compiled):
    mod = _fsdp()
    verl_method = mod.FSDPEngineWithLMHead.prepare_model_outputs.__wrapped__
    V = 77
    x = _logits((7, V), torch.float32).requires_grad_()
    labels = torch.randint(0, V, (7,))
    passes = []
    logprobs = rf_verl.F.logprobs
    monkeypatch.setattr(rf_verl.F, "logprobs", lambda *a, **k: passes.append(1) or logprobs(*a, **k))
    out = _fsdp_call(mod, mod.FSDPEngineWithLMHead.prepare_model_outputs, x, labels, chunked, compiled=compiled)
    assert len(passes) == 1 and hot["fused_entropy_logprobs"] == 1, "entropy and log-probs in one rf pass"
    # verl's own method with verl's own functions, in float64
    rf_verl.unregister()
    x64 = x.detach().double().requires_grad_()
    exp = _fsdp_call(mod, verl_method, x64, labels, False)
    for k in ("log_probs", "entropy"):
        assert_rel(out[k].values(), exp[k].values(), 1e-5, k)
    (out["log_probs"].values() - 0.3 * out["entropy"].values()).sum().backward()
    (exp["log_probs"].values() - 0.3 * exp["entropy"].values()).sum().backward()
    assert_rel(x.grad, x64.grad, 1e-5, "grad logits")


def test_fsdp_engine_no_fusion_without_entropy(hot, monkeypatch):
    mod = _fsdp()
    x = _logits((7, 40), torch.float32)
    labels = torch.randint(0, 40, (7,))
    out = _fsdp_call(mod, mod.FSDPEngineWithLMHead.prepare_model_outputs, x, labels, False, calc_entropy=False)
    assert "entropy" not in out and hot["fused_entropy_logprobs"] == 0 and hot["logprobs_from_logits"] == 1
    assert_rel(out["log_probs"].values(), VERL["logprobs_from_logits"](x.double(), labels), 1e-5, "log_probs")


def test_fused_stash_not_used_for_modified_logits(hot):
    """If the logits change in place between the entropy and the log-prob call, the log-probs are recomputed."""
    x = _logits((6, 30), torch.float32)
    labels = torch.randint(0, 30, (6,))
    with rf_verl._fusing(labels):
        tf.entropy_from_logits(x)
        x.mul_(2.0)
        logp = tf.logprobs_from_logits(x, labels)
    assert_rel(logp, VERL["logprobs_from_logits"](x.double(), labels), 1e-5, "recomputed")


# ----------------------------------------------------------------------------- the Megatron engine's clone
@pytest.fixture(scope="module")
def megatron_tp1():
    """Megatron's parallel_state on a 1-process gloo group (TP = 1): verl's vocab_parallel_* need it."""
    import torch.distributed as dist
    pytest.importorskip("megatron.core", reason="megatron-core==0.16.1 --no-deps is not installed")
    from megatron.core import parallel_state as mpu
    own = not dist.is_initialized()
    if own:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    mpu.initialize_model_parallel(1)
    yield mpu
    mpu.destroy_model_parallel()
    if own:
        dist.destroy_process_group()


def _megatron_call(method, logits, label, chunked, **kw):
    eng = types.SimpleNamespace(engine_config=types.SimpleNamespace(entropy_from_logits_with_chunking=chunked,
                                                                    entropy_from_logits_chunk_size=2))
    args = dict(calculate_sum_pi_squared=False, calculate_entropy=True, distillation_use_topk=False,
                distillation_only=False, logits_processor_func=None, batch=None, data_format="thd")
    args.update(kw)
    return method(eng, logits, label, torch.full(label.shape, 0.8), **args)


@pytest.mark.parametrize("chunked", [False, True])
def test_megatron_engine_no_clone_one_pass_matches_verl(hot, megatron_tp1, monkeypatch, chunked):
    mod = _megatron()
    verl_method = mod.MegatronEngineWithLMHead._lm_head_logits_processor.__wrapped__
    V = 64
    leaf = _logits((2, 5, V), torch.float32).requires_grad_()
    label = torch.randint(0, V, (2, 5))
    passes, clones = [], []
    logprobs = rf_verl.F.logprobs
    monkeypatch.setattr(rf_verl.F, "logprobs", lambda *a, **k: passes.append(1) or logprobs(*a, **k))
    x = leaf * 1.0  # the engine divides its logits by the temperature in place
    real_clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: clones.append(t.shape) or real_clone(t, *a, **k))
    out = _megatron_call(mod.MegatronEngineWithLMHead._lm_head_logits_processor, x, label, chunked)
    monkeypatch.setattr(torch.Tensor, "clone", real_clone)
    assert len(passes) == 1 and not [s for s in clones if s == x.shape], "one rf pass, no clone of the logits"
    assert list(out) == ["entropy", "log_probs"]
    rf_verl.unregister()
    x64 = leaf.detach().double().requires_grad_()
    exp = _megatron_call(verl_method, x64 * 1.0, label, False)
    assert out["log_probs"].dtype == torch.float32
    assert out["entropy"].dtype == torch.float32  # fp32 logits; the chunked variant returns the default dtype
    for k in ("log_probs", "entropy"):
        assert_rel(out[k], exp[k], 1e-5, k)
    (out["log_probs"] + 0.5 * out["entropy"]).sum().backward()
    (exp["log_probs"] + 0.5 * exp["entropy"]).sum().backward()
    assert_rel(leaf.grad, x64.grad, 1e-5, "grad logits")


def test_megatron_engine_distillation_keeps_verls_path(hot, megatron_tp1):
    mod = _megatron()
    x = _logits((2, 3, 20), torch.float32)
    label = torch.randint(0, 20, (2, 3))
    x0 = x.double()
    out = _megatron_call(mod.MegatronEngineWithLMHead._lm_head_logits_processor, x, label, False,
                         distillation_use_topk=True, logits_processor_func=lambda student_logits, **_: {})
    assert hot["megatron_fused_entropy_logprobs"] == 0 and hot["vocab_parallel_entropy"] == 1
    assert_rel(out["log_probs"], VERL["logprobs_from_logits"](x0 / 0.8, label), 1e-5, "log_probs")


# ----------------------------------------------------------------------------- import order
def test_module_imported_after_register_is_reached_and_restored(hot, tmp_path, monkeypatch):
    """A verl module imported after register() takes rf's function from the patched verl module; unregister()
    gives it verl's back."""
    pkg = tmp_path / "verl_late_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from verl.utils.torch_functional import logprobs_from_logits as f\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    late = importlib.import_module("verl_late_probe")
    sys.modules["verl.late_probe"] = late  # a verl.* module name, as a verl submodule imported late would have
    try:
        assert late.f is rf_verl.logprobs_from_logits
        rf_verl.unregister()
        assert late.f is VERL["logprobs_from_logits"]
    finally:
        del sys.modules["verl.late_probe"], sys.modules["verl_late_probe"]


def test_register_warns_for_modules_it_cannot_import(monkeypatch):
    monkeypatch.setitem(rf_verl._HOT_SOURCES, "verl.no_such_module", ("f",))
    with pytest.warns(RuntimeWarning, match="verl.no_such_module"):
        rf_verl.register()
    rf_verl.unregister()
    assert tf.logprobs_from_logits is VERL["logprobs_from_logits"]


# ----------------------------------------------------------------------------- the benchmark script
def test_verl_hot_path_benchmark_cases_run(megatron_tp1):
    """benchmarks/verl_hot_path.py: every case runs on both sides at tiny sizes, and its table renders."""
    from benchmarks import verl_hot_path as B
    cases = B._cases(B.parse_args(["--rows", "8", "--vocab", "64", "--hidden", "16"]))
    ran = []
    try:
        for name, (verl_step, rf_step, note) in cases.items():
            if verl_step is None:
                assert note.startswith("not measured")
                continue
            for side, step in (("verl", verl_step), ("rf", rf_step)):
                (rf_verl.register if side == "rf" else rf_verl.unregister)()
                for t in step.leaves:
                    t.grad = None
                step()
                assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in step.leaves), (name, side)
            ran.append(name)
    finally:
        rf_verl.unregister()
    assert {"fsdp_engine_step", "megatron_engine_step", "FusedLinearForPPO", "logprobs_from_logits"} <= set(ran)
    row = {"verl_ms": 2.0, "rf_ms": 1.0, "verl_peak_mib": 4.0, "rf_peak_mib": 1.0, "time_ratio_verl_over_rf": 2.0,
           "peak_ratio_verl_over_rf": 4.0, "note": ""}
    md = B.markdown({"verl": "0.9.1", "label": "CPU", "shape": {"N": 8, "V": 64, "H": 16, "dtype": "float32"},
                     "threads": 1, "meta": {"device_name": "cpu", "git_commit": "x"}, "memory": "m",
                     "cases": {"fsdp_engine_step": row, "linear_cross_entropy": {"note": "not measured"}}})
    assert "| fsdp_engine_step | 2.0 | 1.0 | 2.00 | 4 | 1 | 4.00 |" in md
