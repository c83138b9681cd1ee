"""torch.compile: the kernels are custom ops, so EPT and FPT models trace as one graph and compiled runs match eager."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from helpers import images, prompted, small_fpt, tiny_vit
from timm.models.vision_transformer import VisionTransformer
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._inductor.compile_fx import compile_fx

from fastprompt.kernels.dispatch import triton_importable
from fastprompt.kernels.reference import sink_attention_reference

sink_module = importlib.import_module("fastprompt.kernels.sink_attention")  # the package attribute is the function
importance_module = importlib.import_module("fastprompt.kernels.importance")
dispatch = importlib.import_module("fastprompt.kernels.dispatch")

FORWARD = "fastprompt.sink_attention_forward.default"
BACKWARD = "fastprompt.sink_attention_backward.default"
ROW_DELTA = "fastprompt.sink_attention_row_delta.default"
IMPORTANCE = "fastprompt.attention_importance.default"
needs_triton = pytest.mark.skipif(not triton_importable(), reason="needs triton")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test traces from scratch; inductor compiles in-process (no worker pool to start on a small CI box)."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(compile_threads=1):
        yield
    torch._dynamo.reset()


@pytest.fixture
def no_compile_caches():
    """The compile caches key on the traced graph, not on the Python of a custom op's registered backward: a cached
    compiled backward would hide a change to that formula (seen: a wrong lse in it passed with warm caches)."""
    with torch._inductor.config.patch(force_disable_caches=True):
        yield


def fastprompt_calls(graphs: list[torch.fx.GraphModule]) -> list[tuple[str, str]]:
    """(op, backend) of every fastprompt custom-op call in `graphs`, in graph order (backend is the last argument)."""
    return [
        (str(node.target), node.args[-1])
        for graph in graphs
        for node in graph.graph.nodes
        if node.op == "call_function" and str(node.target).startswith("fastprompt.")
    ]


def recording_inductor(graphs: list[torch.fx.GraphModule]):
    """A torch.compile backend: keeps every graph dynamo hands over, then compiles it with inductor."""

    def backend(graph: torch.fx.GraphModule, example_inputs):
        graphs.append(graph)
        return compile_fx(graph, example_inputs)

    return backend


def recording_aot_eager(forward_graphs: list, backward_graphs: list):
    """aot_eager that keeps AOTAutograd's forward and backward graphs (where the backward formula's ops appear)."""

    def keep(store):
        def compiler(graph: torch.fx.GraphModule, example_inputs):
            store.append(graph)
            return make_boxed_func(graph.forward)

        return compiler

    return aot_autograd(fw_compiler=keep(forward_graphs), bw_compiler=keep(backward_graphs))


def prompted_vit() -> VisionTransformer:
    """A 2-block EPT ViT (3 classes, 5 prompts) with std-1 prompts, so the sink visibly competes with the logits."""
    return prompted(tiny_vit(num_classes=3), prompt_length=5)


def logits_and_grads(model: torch.nn.Module, run, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits of run(x) and the gradient of a fixed random weighting of them for every trainable parameter."""
    logits = run(x)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(4))
    (logits * weights).sum().backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def assert_compiled_matches_eager(eager_model: torch.nn.Module, x: torch.Tensor, graphs: list) -> None:
    compiled_model = copy.deepcopy(eager_model)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=recording_inductor(graphs))
    want_logits, want_grads = logits_and_grads(eager_model, eager_model, x)
    got_logits, got_grads = logits_and_grads(compiled_model, compiled, x)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        assert want.abs().max() > 0, name  # every trainable part really receives a gradient
        torch.testing.assert_close(got_grads[name], want, rtol=1e-4, atol=1e-5 * want.abs().max().item(), msg=name)


@pytest.mark.slow
def test_ept_vit_compiles_fullgraph_with_inductor_and_matches_eager():
    model = prompted_vit()
    graphs = []
    assert_compiled_matches_eager(model, images(seed=2), graphs)
    assert fastprompt_calls(graphs) == [(FORWARD, "flash_cpu")] * len(model.blocks)  # one op per prompted layer


@pytest.mark.slow
def test_fpt_compiles_fullgraph_with_inductor_and_matches_eager():
    model = small_fpt().eval()
    graphs = []
    assert_compiled_matches_eager(model, images(seed=2), graphs)
    ops = [op for op, _ in fastprompt_calls(graphs)]
    layers = len(model.layers)
    # every extracted layer but the last runs the attention forward (its output feeds the next block) + the scores
    assert ops.count(IMPORTANCE) == layers and ops.count(FORWARD) == layers - 1, ops


@pytest.mark.parametrize("backend", ["flash_cpu", "chunked", pytest.param("triton", marks=needs_triton)])
def test_compiled_sink_attention_gradients_are_exact(backend, no_compile_caches):
    """dq, dk, dv and the sink's gradient through inductor, against the fp64 reference (not only O and dg: the
    flash-attention ops' lse carries no gradient, and the dq/dk terms through it must not be lost)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 19, 16) for _ in range(3))
    sink = torch.randn(19) * 2 + 1
    dout = torch.randn(2, 3, 19, 16, dtype=torch.float64)

    def attention(q, k, v, sink):
        return sink_module._sink_attention(q, k, v, sink, None, False, backend)

    graphs = []
    compiled = torch.compile(attention, fullgraph=True, backend=recording_inductor(graphs))
    results = {}
    for name, fn, dtype in (("compiled", compiled, torch.float32), ("reference", sink_attention_reference, None)):
        inputs = [t.to(dtype or torch.float64).requires_grad_() for t in (q, k, v, sink)]
        out = fn(*inputs)
        results[name] = (out, *torch.autograd.grad(out, inputs, dout.to(out.dtype)))
    for what, got, want in zip(("out", "dq", "dk", "dv", "dsink"), results["compiled"], results["reference"]):
        assert want.abs().max() > 1e-3, what
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5 * want.abs().max().item(), msg=what)
    assert fastprompt_calls(graphs) == [(FORWARD, backend)]


@pytest.fixture
def triton_path_on_meta(monkeypatch):
    """Dispatch meta tensors to the Triton path with the interpreter off: tracing must never reach a launch."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("FASTPROMPT_DISABLE_TRITON", raising=False)
    monkeypatch.setattr(dispatch, "TRITON_DEVICE_TYPES", ("cuda", "meta"))


def on_meta(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    return model.to(device="meta", dtype=dtype)


@needs_triton
def test_explain_finds_no_graph_break_on_the_triton_path(triton_path_on_meta):
    """EPT's forward, and FPT's frozen branch (the part that runs kernels; its side network needs autocast, which the
    meta device lacks), each trace as one graph whose fastprompt calls are Triton custom ops."""
    ept = on_meta(prompted_vit())
    fpt = on_meta(small_fpt().eval())
    x = torch.randn(2, 3, 32, 32, device="meta", dtype=torch.bfloat16)
    layers = len(fpt.layers)
    expected = {
        "ept": (ept, [FORWARD] * len(ept.blocks)),
        "fpt": (fpt.extract_features, sorted([FORWARD] * (layers - 1) + [IMPORTANCE] * layers)),
    }
    for name, (fn, ops) in expected.items():
        explanation = torch._dynamo.explain(fn)(x)
        assert explanation.graph_break_count == 0, (name, explanation.break_reasons)
        assert explanation.graph_count == 1, name
        calls = fastprompt_calls(explanation.graphs)
        assert sorted(op for op, _ in calls) == ops, (name, calls)
        assert {backend for _, backend in calls} == {"triton"}, (name, calls)


@needs_triton
def test_triton_backward_traces_as_custom_ops(triton_path_on_meta):
    """AOTAutograd traces the registered backward formula: the row-delta and backward ops, no Triton launch code."""
    model = on_meta(prompted_vit())
    x = torch.randn(2, 3, 32, 32, device="meta", dtype=torch.bfloat16)
    forward_graphs, backward_graphs = [], []
    compiled = torch.compile(model, fullgraph=True, backend=recording_aot_eager(forward_graphs, backward_graphs))
    compiled(x).float().sum().backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters() if p.requires_grad)
    assert fastprompt_calls(forward_graphs) == [(FORWARD, "triton")] * 2
    # the first prompted layer's q, k, v need no gradient (frozen patch embedding): only its sink gradient runs
    assert sorted(fastprompt_calls(backward_graphs)) == sorted([(ROW_DELTA, "triton")] * 2 + [(BACKWARD, "triton")])


def op_cases():
    torch.manual_seed(0)
    q, k, v = (t.requires_grad_() for t in torch.randn(3, 2, 3, 11, 16).unbind(0))
    g = (torch.randn(11) * 2).expand(2, 3, 11).requires_grad_()  # an expanded sink, as sink_attention passes it
    lse = torch.logsumexp(q.detach() @ k.detach().transpose(-2, -1) * 0.25, -1)
    cases = []
    for backend in ("flash_cpu", "chunked", "triton"):
        marks = [needs_triton] if backend == "triton" else []
        cases.append(
            pytest.param(sink_module._forward_op, (q, k, v, g, 0.25, backend), marks=marks, id=f"fwd-{backend}")
        )
        out, lse_p, _ = sink_module._forward(backend if backend != "triton" else "chunked", q, k, v, g, 0.25)
        dout = torch.randn_like(q)
        delta = (dout * out).sum(-1)
        args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse_p.detach(), delta.detach(), 0.25, backend)
        cases.append(pytest.param(sink_module._backward_op, args, marks=marks, id=f"bwd-{backend}"))
        cases.append(
            pytest.param(sink_module._row_delta_op, (dout, out.detach(), backend), marks=marks, id=f"delta-{backend}")
        )
    for backend in ("torch", "triton"):
        marks = [needs_triton] if backend == "triton" else []
        for rows, lse_arg in ((11, None), (1, lse), (11, lse)):
            args = (q.detach(), k.detach(), lse_arg, rows, 0.25, backend)
            name = f"importance-{backend}-rows{rows}-{'lse' if lse_arg is not None else 'nolse'}"
            cases.append(pytest.param(importance_module._importance_op, args, marks=marks, id=name))
    return cases


@pytest.mark.parametrize(("op", "args"), op_cases())
def test_custom_ops_pass_opcheck(op, args):
    """PyTorch's own checks: schema, fake implementation (shapes, dtypes, strides) against the real output, autograd
    registration, and tracing with dynamic shapes."""
    torch.library.opcheck(op, args)


@pytest.mark.gpu
def test_gpu_ept_compiles_and_matches_eager_in_bf16():
    model = prompted_vit().cuda().bfloat16()
    x = images(count=4, seed=2).cuda().bfloat16()
    graphs = []
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=recording_inductor(graphs))
    want_logits, want_grads = logits_and_grads(model, model, x)
    got_logits, got_grads = logits_and_grads(compiled_model, compiled, x)
    assert fastprompt_calls(graphs) == [(FORWARD, "triton")] * len(model.blocks)
    torch.testing.assert_close(got_logits.float(), want_logits.float(), rtol=3e-2, atol=3e-2)
    for name, want in want_grads.items():
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got_grads[name].float(), want.float(), rtol=5e-2, atol=5e-2 * scale, msg=name)
