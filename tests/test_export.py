"""torch.export of the QnA layer and of QnA-ViT (dynamic shapes), ``qna_triton.export.decompose``, and
an AOTInductor package that runs in a process without the library (CPU)."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import DEPLOY_VIT, Case, make_inputs
from torch.export import Dim

from qna_triton import QnA, qna_attention
from qna_triton.export import decompose, decompositions
from qna_vit import create_model

QNA_OPS = (torch.ops.qna.attention.default, torch.ops.qna.attention_packed.default)

# (kernel_size, stride, padding, attn_scale, use_bias): square and rectangular windows, strides 1 and 2
LAYERS = [(3, 1, None, "normal", False), ((3, 5), (2, 1), (1, 2), "ones", True), (2, 2, 0, "none", False)]


def qna_nodes(program):
    return [n for n in program.graph.nodes if n.target in QNA_OPS]


def layer_program(cfg):
    k, s, p, mode, bias = cfg
    torch.manual_seed(0)
    layer = QnA(8, 12, 3, kernel_size=k, stride=s, padding=p, attn_scale=mode, use_bias=bias).eval()
    with torch.no_grad():
        layer.rpe_bias.normal_(0.0, 0.5)  # zero at init; the export must carry it
    shapes = {"x": {0: Dim("batch"), 1: Dim("height", min=4), 2: Dim("width", min=6)}}
    return layer, torch.export.export(layer, (torch.randn(2, 9, 11, 8),), dynamic_shapes=shapes)


SIZES = [(1, 7, 8, 8), (3, 12, 6, 8), (2, 9, 11, 8)]


@pytest.mark.parametrize("cfg", LAYERS, ids=str)
@torch.no_grad()
def test_export_layer_dynamic_batch_and_size(cfg):
    layer, program = layer_program(cfg)
    assert len(qna_nodes(program)) == 1  # the op is one node: the same run-time dispatch as eager
    for shape in SIZES:
        x = torch.randn(shape)
        torch.testing.assert_close(program.module()(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("cfg", LAYERS, ids=str)
@torch.no_grad()
def test_decompose_layer(cfg):
    layer, program = layer_program(cfg)
    flat = decompose(program)
    assert not qna_nodes(flat)
    assert len(qna_nodes(program)) == 1  # the program given is left as it was
    for shape in SIZES:
        x = torch.randn(shape)
        torch.testing.assert_close(flat.module()(x), layer(x), rtol=1e-5, atol=1e-6)


class Core(torch.nn.Module):
    """The functional core op (``qna::attention``) with a stride-2 rectangular window."""

    def forward(self, logits, values, rpb, scale):
        return qna_attention(logits, values, rpb, scale, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0))


@torch.no_grad()
def test_decompose_core_op_dynamic_batch():
    case = Case(B=2, H=7, W=6, N=2, h=3, d=4, k=(3, 2), s=(2, 1), p=(1, 0))
    inputs = make_inputs(case, dtype=torch.float32)
    batch = Dim("batch")
    shapes = ({0: batch}, {0: batch}, None, None)
    program = torch.export.export(Core(), inputs, dynamic_shapes=shapes)
    assert [n.target for n in qna_nodes(program)] == [torch.ops.qna.attention.default]
    flat = decompose(program)
    assert not qna_nodes(flat)
    for B in (1, 3):
        logits, values, rpb, scale = make_inputs(dataclasses.replace(case, B=B), dtype=torch.float32, seed=B)
        torch.testing.assert_close(
            flat.module()(logits, values, rpb, scale), Core()(logits, values, rpb, scale), rtol=1e-5, atol=1e-6
        )


def test_decompose_rejects_a_module():
    with pytest.raises(TypeError, match="program must be a torch.export.ExportedProgram"):
        decompose(QnA(8, 8, 2))


def test_decompositions_merge_into_the_default_table():
    table = torch.export.default_decompositions()
    table.update(decompositions())
    assert set(QNA_OPS) <= set(table.keys())


def deploy_vit():
    torch.manual_seed(0)
    model = create_model("qna_vit_tiny", **DEPLOY_VIT).eval()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, QnA):
                layer.rpe_bias.normal_(0.0, 0.5)
    return model


@torch.no_grad()
def test_export_qna_vit_dynamic_batch():
    model = deploy_vit()
    program = torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes={"x": {0: Dim("batch")}})
    assert len(qna_nodes(program)) == sum(isinstance(m, QnA) for m in model.modules()) == 2
    flat = decompose(program)
    for B in (1, 3):
        x = torch.randn(B, 3, 32, 32)
        expected = model(x)
        torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(flat.module()(x), expected, rtol=1e-5, atol=1e-5)


# The loading process imports torch only, and fails if the library or the model code was imported.
LOAD_AND_RUN = textwrap.dedent("""
    import sys, torch
    runner = torch._inductor.aoti_load_package(sys.argv[1])
    data = torch.load(sys.argv[2])
    for x, expected in zip(data["inputs"], data["outputs"]):
        torch.testing.assert_close(runner(x), expected, rtol=1e-5, atol=1e-5)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("qna_triton", "qna_vit"))
    assert not loaded, loaded
    print("ran", len(data["inputs"]), "batches")
""")


@torch.no_grad()
def test_aoti_package_runs_without_the_library(tmp_path):
    model = deploy_vit()
    program = decompose(
        torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes={"x": {0: Dim("batch", max=64)}})
    )
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "qna_vit.pt2"))
    inputs = [torch.randn(B, 3, 32, 32) for B in (1, 3)]
    torch.save({"inputs": inputs, "outputs": [model(x) for x in inputs]}, tmp_path / "data.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", LOAD_AND_RUN, package, str(tmp_path / "data.pt")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ran 2 batches" in run.stdout
