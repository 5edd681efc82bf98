"""ONNX: ``torch.onnx.export(model, (x,), dynamo=True)`` on QnA layers (all six attention-scale modes,
strides 1 and 2, dynamic batch and size) and on QnA-ViT, run by onnxruntime against PyTorch; stability
for logits of any range; the ExportedProgram route through ``qna_triton.export.decompose``."""

import dataclasses
import math

import pytest
import torch
from torch.export import Dim

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from helpers import DEPLOY_VIT, Case, make_inputs, oracle  # noqa: E402

from qna_triton import ATTN_SCALE_MODES, QnA, ops, qna_attention  # noqa: E402
from qna_triton.export import LEAN_ONNX, decompose, route  # noqa: E402
from qna_triton.reference import direct_qna_attention  # noqa: E402
from qna_vit import create_model  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)


def run_onnx(program, *inputs):
    """``program``'s outputs under onnxruntime (CPU), as tensors."""
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in session.run(None, feed)]


def assert_standard_onnx(program):
    """Only operators of the default ONNX domain, no local functions: no QnA operator left to register."""
    model = program.model_proto
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, {n.domain for n in model.graph.node}
    assert not model.functions


def assert_lean(program, most_nodes=60):
    """The lean translation: per layer, the two depthwise convolutions (``Conv``) in a short main graph
    and an ``If`` per result that finishes the paper form or, for inputs at risk, runs the streaming
    form, rather than the streaming form's per-offset nodes inline (from torch 2.15, whose exporter
    turns ``torch.cond`` into ``If``; older ones get the streaming form)."""
    graph = program.model_proto.graph
    if not LEAN_ONNX:
        assert not [n for n in graph.node if n.op_type == "If"]
        return
    ifs = [n for n in graph.node if n.op_type == "If"]
    assert ifs and len(graph.node) <= most_nodes * len(ifs), (len(graph.node), len(ifs))
    assert sum(n.op_type == "Conv" for n in graph.node) >= 2
    for node in ifs:  # then: the streaming form; else: the paper form finished from the convolutions
        branches = {a.name: [n.op_type for n in a.g.node] for a in node.attribute}
        assert "Conv" not in branches["then_branch"] and "Exp" in branches["then_branch"], branches
        assert len(branches["else_branch"]) <= 8 and "Conv" not in branches["else_branch"], branches


class Modes(torch.nn.Module):
    """One QnA layer per attention-scale mode on the same input: windows 1 to 3 wide (square and
    rectangular), strides 1 and 2 (per axis too), biases on and off."""

    GEOMETRY = [
        (3, 2, None),
        ((3, 2), 1, (1, 0)),
        (3, 1, 0),
        ((2, 3), (2, 1), (1, 1)),
        (3, (1, 2), None),
        ((1, 3), 2, None),
    ]

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            QnA(8, 12, 3, kernel_size=k, stride=s, padding=p, attn_scale=mode, use_bias=i % 2 == 1)
            for i, (mode, (k, s, p)) in enumerate(zip(ATTN_SCALE_MODES, self.GEOMETRY))
        )
        with torch.no_grad():
            for layer in self.layers:  # zero at init; the translation must carry them
                layer.rpe_bias.normal_(0.0, 0.5)
                for t in (layer.attn_scale_weights, layer.attn_scale_pos):
                    if t is not None:
                        t.normal_(1.0, 0.5)

    def forward(self, x):
        return tuple(layer(x) for layer in self.layers)


@torch.no_grad()
def test_layer_all_modes_dynamic_batch():
    """Every attention-scale mode's layer (each geometry of ``Modes``) exported with a dynamic batch."""
    torch.manual_seed(0)
    model = Modes().eval()
    program = torch.onnx.export(
        model, (torch.randn(2, 9, 11, 8),), dynamo=True, dynamic_shapes={"x": {0: Dim("batch")}}
    )
    assert_standard_onnx(program)
    for batch in (1, 3):
        x = torch.randn(batch, 9, 11, 8)
        for mode, o, e in zip(ATTN_SCALE_MODES, run_onnx(program, x), model(x)):
            assert o.shape == e.shape, (mode, batch)
            torch.testing.assert_close(o, e, **TOL, msg=lambda m, mode=mode, batch=batch: f"{mode} at {batch}: {m}")


@torch.no_grad()
def test_layer_dynamic_batch_and_size():
    """A layer exported with dynamic batch, height and width runs at other sizes (down to one window),
    rectangular and strided (the size logic is the same for every mode: one layer exports it; exporting
    all six this way took about twice the time of the test above)."""
    # torch.cond's branches are traced by Dynamo and cached per function: after another export of the
    # same sizes in this process (the test above), the cached static traces would make this export's
    # height and width static, silently (torch 2.15; README, Deploy)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Modes().eval()
    layer = model.layers[3]  # stride (2, 1) on a (2, 3) window, padding (1, 1), with a scale
    shapes = {"x": {0: Dim("batch"), 1: Dim("height", min=3), 2: Dim("width", min=3)}}
    program = torch.onnx.export(layer, (torch.randn(2, 9, 11, 8),), dynamo=True, dynamic_shapes=shapes)
    assert_standard_onnx(program)
    dims = program.model_proto.graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, True, True, False]
    for shape in [(1, 7, 8, 8), (3, 12, 5, 8), (2, 16, 16, 8), (1, 3, 4, 8)]:
        x = torch.randn(shape)
        (got,) = run_onnx(program, x)
        expected = layer(x)
        assert got.shape == expected.shape, shape
        torch.testing.assert_close(got, expected, **TOL, msg=lambda m, shape=shape: f"at {shape}: {m}")


class Core(torch.nn.Module):
    """``qna_attention`` (``qna::attention``) with a stride-2 window; padding 2 on a width-2 window
    leaves the first output column's windows without a pixel inside the image (output 0).
    ``with_lse``: the op's two results through the route the layers take (the translation of ``lse``
    is a branch of its own, dropped from graphs that do not use it)."""

    GEOMETRY = ((3, 2), (2, 1), (1, 2))

    def __init__(self, with_lse: bool = False):
        super().__init__()
        self.with_lse = with_lse

    def forward(self, logits, values, rpb, scale):
        ks, st, pd = self.GEOMETRY
        if self.with_lse:
            return route(ops.attention)(logits, values, rpb, scale, list(ks), list(st), list(pd))
        return qna_attention(logits, values, rpb, scale, kernel_size=ks, stride=st, padding=pd)


@pytest.mark.parametrize(
    "logit_scale, query_minor", [(2.0, False), (1e4, False), (2.0, True)], ids=["logits~2", "logits~1e4", "query-minor"]
)
@torch.no_grad()
def test_core_op_stable_for_any_logit_range(logit_scale, query_minor):
    case = Case(B=2, H=7, W=6, N=2, h=3, d=4, k=(3, 2), s=(2, 1), p=(1, 2))
    batch = Dim("batch")
    program = torch.onnx.export(
        Core(with_lse=True).eval(),
        make_inputs(case, dtype=torch.float32, query_minor_logits=query_minor),
        dynamo=True,
        dynamic_shapes=({0: batch}, {0: batch}, None, None),
    )
    assert_standard_onnx(program)
    assert_lean(program)
    if LEAN_ONNX:  # one If per result
        assert sum(n.op_type == "If" for n in program.model_proto.graph.node) == 2
    for B in (1, 3):
        inputs = make_inputs(
            dataclasses.replace(case, B=B),
            dtype=torch.float32,
            seed=B,
            logit_scale=logit_scale,
            query_minor_logits=query_minor,
        )
        got, got_lse = run_onnx(program, *inputs)
        expected = oracle(*inputs, Core.GEOMETRY).float()
        assert torch.isfinite(got).all()
        assert got[:, :, 0].abs().max() == 0  # the empty windows
        torch.testing.assert_close(got, expected, **TOL)
        torch.testing.assert_close(got, Core()(*inputs), **TOL)
        lse = direct_qna_attention(*(t.double() for t in inputs), *Core.GEOMETRY)[1]
        assert got_lse.stride() == got_lse.contiguous().stride()  # onnxruntime's own layout
        assert (got_lse[:, :, 0] == -math.inf).all()  # no pixel in the window
        torch.testing.assert_close(got_lse, lse.float(), rtol=1e-5, atol=1e-4)


def test_lse_dropped_when_unused():
    """A model that uses only the output (as the layers do) keeps one ``If`` per QnA op, no ``Log``
    (from torch 2.15; the streaming form before)."""
    case = Case(B=2, H=7, W=6, N=2, h=3, d=4, k=(3, 2), s=(2, 1), p=(1, 2))
    with torch.no_grad():
        program = torch.onnx.export(Core().eval(), make_inputs(case, dtype=torch.float32), dynamo=True)
    ops_used = [n.op_type for n in program.model_proto.graph.node]
    if LEAN_ONNX:
        assert ops_used.count("If") == 1 and "Log" not in ops_used, ops_used
    else:  # the streaming form, no branches
        assert "If" not in ops_used and "Exp" in ops_used, ops_used


@torch.no_grad()
def test_qna_vit_dynamic_batch():
    torch.manual_seed(0)
    model = create_model("qna_vit_tiny", **DEPLOY_VIT).eval()
    program = torch.onnx.export(
        model, (torch.randn(2, 3, 32, 32),), dynamo=True, dynamic_shapes={"x": {0: Dim("batch")}}
    )
    assert_standard_onnx(program)
    for B in (1, 3):
        x = torch.randn(B, 3, 32, 32)
        torch.testing.assert_close(run_onnx(program, x)[0], model(x), **TOL)


@torch.no_grad()
def test_exported_program_route():
    torch.manual_seed(0)
    layer = QnA(8, 8, 2, kernel_size=3, stride=2).eval()
    exported = torch.export.export(layer, (torch.randn(2, 9, 10, 8),), dynamic_shapes={"x": {0: Dim("batch")}})
    program = torch.onnx.export(decompose(exported), dynamo=True)
    assert_standard_onnx(program)
    x = torch.randn(3, 9, 10, 8)
    torch.testing.assert_close(run_onnx(program, x)[0], layer(x), **TOL)
