"""NF4Linear / Int8Linear: exact forward, input gradients, LoRA parity, modes, compile, state."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError
from lorakit.quant import Int8Linear, NF4Linear

IN, OUT, R = 64, 48, 4


def make(kind: str, bias: bool = True, compute_dtype=torch.float32, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    linear = nn.Linear(IN, OUT, bias=bias)
    cls = NF4Linear if kind == "nf4" else Int8Linear
    return cls.from_linear(linear, compute_dtype=compute_dtype, **kw)


def reference(layer: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the layer promises: cast x, dequantize W, F.linear in `dtype`, cast back."""
    w = layer.dequantized_weight(dtype)
    b = None if layer.bias is None else layer.bias.to(dtype)
    return F.linear(x.to(dtype), w, b).to(x.dtype)


KINDS = ["nf4", "int8"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_grad_equal_reference(kind, bias, compute_dtype):
    layer = make(kind, bias, compute_dtype)
    x = torch.randn(2, 5, IN, requires_grad=True)
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (2, 5, OUT)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = reference(layer, x_ref, compute_dtype)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_trainable_and_no_weight_grad(kind):
    layer = make(kind)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == []
    assert not any(isinstance(b, nn.Parameter) for b in layer.buffers())
    x = torch.randn(3, IN, requires_grad=True)
    layer(x).sum().backward()
    assert layer.bias.grad is None
    assert all(b.grad is None for b in layer.buffers())
    assert not hasattr(layer, "weight")  # no full-precision weight hanging around


@pytest.mark.parametrize("kind", KINDS)
def test_unfrozen_bias_gets_its_gradient(kind):
    layer = make(kind)
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 3, IN)
    g = torch.randn(2, 3, OUT)
    layer(x).backward(g)
    assert torch.allclose(layer.bias.grad, g.sum((0, 1)))


def lora_pair(seed: int = 1) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(seed)
    a, b = nn.Linear(IN, R, bias=False), nn.Linear(R, OUT, bias=False)
    nn.init.normal_(b.weight)  # non-zero B so both A and B get gradients
    return a, b


@pytest.mark.parametrize("kind", KINDS)
def test_lora_parity_with_plain_linear_holding_the_dequantized_weight(kind):
    q = make(kind, compute_dtype=torch.float32)
    plain = nn.Linear(IN, OUT)
    with torch.no_grad():
        plain.weight.copy_(q.dequantized_weight(torch.float32))
        plain.bias.copy_(q.bias)
    plain.requires_grad_(False)
    x = torch.randn(4, 6, IN)
    results = []
    for base in (q, plain):
        a, b = lora_pair()
        y = base(x) + b(a(x))
        y.pow(2).mean().backward()
        results.append((y.detach(), a.weight.grad, b.weight.grad))
    for got, want in zip(results[0], results[1]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_flow_after_eval_no_grad_then_train(kind):
    layer = make(kind, compute_dtype=torch.bfloat16)
    a, b = lora_pair()
    x = torch.randn(3, IN)
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x) + b(a(x))
    layer.train()
    x_req = x.clone().requires_grad_()
    y = layer(x_req) + b(a(x_req))
    y.sum().backward()
    assert torch.equal(y.detach(), y_eval)
    for grad in (x_req.grad, a.weight.grad, b.weight.grad):
        assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_autocast_does_not_override_compute_dtype(kind):
    layer = make(kind, compute_dtype=torch.float32)
    x = torch.randn(3, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32 and torch.equal(y, layer(x))


def test_compute_dtype_none_follows_the_input():
    layer = make("nf4", compute_dtype=None)
    x = torch.randn(3, IN, dtype=torch.float16)
    assert torch.equal(layer(x), reference(layer, x, torch.float16))
    assert layer.dequantized_weight().dtype == torch.float32


@pytest.mark.parametrize(("kind", "backend"), [("nf4", "aot_eager"), ("int8", "inductor")])
def test_torch_compile_fullgraph(kind, backend):
    # inductor on the NF4 layer works too (bit-identical) but costs ~5 s of compile on 2 cores
    torch._dynamo.reset()
    layer = make(kind, compute_dtype=torch.float32)
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    x = torch.randn(5, IN, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = compiled(x), layer(x_ref)
    y.sum().backward()
    y_ref.sum().backward()
    assert torch.allclose(y, y_ref, atol=1e-6) and torch.allclose(x.grad, x_ref.grad, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_roundtrip_into_an_empty_layer(kind):
    layer = make(kind, compute_dtype=torch.float32)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    if kind == "nf4":
        empty = NF4Linear(IN, OUT, bias=True, blocksize=64, double_quant=True, compute_dtype=torch.float32)
        assert set(layer.state_dict()) == {
            "bias", "weight_data", "weight_absmax", "weight_absmax_scale", "weight_absmax_offset"
        }  # fmt: skip
    else:
        empty = Int8Linear(IN, OUT, bias=True, compute_dtype=torch.float32)
        assert set(layer.state_dict()) == {"bias", "weight_data", "weight_scale"}
    empty.load_state_dict(torch.load(buf))
    x = torch.randn(2, IN)
    assert torch.equal(empty(x), layer(x))


def test_nf4_without_double_quant_state_dict():
    layer = make("nf4", double_quant=False, blocksize=128)
    assert "weight_absmax_scale" not in layer.state_dict()
    empty = NF4Linear(IN, OUT, blocksize=128, double_quant=False)
    empty.load_state_dict(layer.state_dict())
    assert torch.equal(empty.dequantized_weight(torch.float32), layer.dequantized_weight(torch.float32))


@pytest.mark.parametrize("kind", KINDS)
def test_model_to_half_keeps_fp32_scales(kind):
    layer = make(kind, compute_dtype=torch.bfloat16)
    before = layer.dequantized_weight(torch.float32)
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantized_weight(torch.float32), before)
    layer.half()
    assert torch.equal(layer.dequantized_weight(torch.float32), before)
    layer.to("meta")
    assert all(b.device.type == "meta" for b in layer.buffers())


def test_quantized_weight_view_and_repr():
    layer = make("nf4", blocksize=128, double_quant=True)
    q = layer.quantized_weight
    assert q.shape == (OUT, IN) and q.blocksize == 128 and q.data.data_ptr() == layer.weight_data.data_ptr()
    text = repr(layer)
    assert "in_features=64" in text and "out_features=48" in text
    assert "blocksize=128" in text and "double_quant=True" in text
    assert "in_features=64" in repr(make("int8"))


def test_from_linear_errors():
    with pytest.raises(LorakitError, match="meta device"):
        NF4Linear.from_linear(nn.Linear(4, 4, device="meta"))
    with pytest.raises(LorakitError, match="needs an nn.Linear"):
        Int8Linear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(LorakitError, match="blocksize 100"):
        NF4Linear.from_linear(nn.Linear(4, 4), blocksize=100)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_cpu(kind):
    layer = make(kind, compute_dtype=torch.float32)
    x = torch.randn(4, IN)
    cuda = make(kind, compute_dtype=torch.float32).cuda()
    assert torch.equal(cuda.dequantized_weight().cpu(), layer.dequantized_weight())
    assert torch.allclose(cuda(x.cuda()).cpu(), layer(x), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_meta_init_then_to_empty_then_load(kind):
    """The init-on-meta loading path (accelerate/transformers style)."""
    layer = make(kind, compute_dtype=torch.float32)
    if kind == "nf4":
        empty = NF4Linear(IN, OUT, compute_dtype=torch.float32, device="meta")
    else:
        empty = Int8Linear(IN, OUT, compute_dtype=torch.float32, device="meta")
    empty.to_empty(device="cpu")
    empty.load_state_dict(layer.state_dict())
    x = torch.randn(2, IN)
    assert torch.equal(empty(x), layer(x))


def test_one_type_test_for_quantized_layers_and_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    from lorakit.quant import QuantizedLinear, is_conv1d, is_linear

    conv = Conv1D(OUT, IN)
    assert is_conv1d(conv) and is_linear(conv) and not is_conv1d(nn.Linear(IN, OUT))
    for kind in ("nf4", "int8"):
        layer = make(kind)
        assert isinstance(layer, QuantizedLinear) and is_linear(layer) and not is_conv1d(layer)
    assert not is_linear(nn.Embedding(4, 4)) and not is_linear(nn.LayerNorm(4))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_to_linear_holds_the_dequantized_weight_and_bias(kind: str) -> None:
    layer = make(kind)
    plain = layer.to_linear(torch.bfloat16)
    assert type(plain) is nn.Linear and plain.weight.dtype == torch.bfloat16 and not plain.weight.requires_grad
    assert torch.equal(plain.weight, layer.dequantized_weight(torch.float32).to(torch.bfloat16))
    assert torch.equal(plain.bias, layer.bias.to(torch.bfloat16))
    given = torch.ones(OUT, IN)
    assert torch.equal(layer.to_linear(torch.float32, given).weight, given)
