import pytest
import torch

from adaptserve.model.projection import NATIVE, Projection, quantize_model


def _projection(bias: bool = True) -> Projection:
    torch.manual_seed(0)
    proj = Projection(256, 96, bias=bias)
    with torch.no_grad():
        proj.weight.normal_(0, 0.05)
    return proj


@pytest.mark.parametrize("fmt, tolerance", [("bf16", 0.01), ("fp8", 0.06), ("int4", 0.15)])
def test_each_format_stays_close_to_native(fmt, tolerance):
    proj = _projection()
    proj.quantize((fmt,), int4_group_size=64)
    x = torch.randn(5, 256)
    native = proj(x)
    low = proj(x, fmt)
    assert low.shape == native.shape and low.dtype == native.dtype
    error = (low - native).norm() / native.norm()
    assert 0 < error < tolerance  # a different format really ran, and it is close


def test_unheld_formats_fall_back_to_native_and_state_dicts_see_native_only():
    proj = _projection()
    x = torch.randn(3, 256)
    assert torch.equal(proj(x, "int4"), proj(x, NATIVE))
    proj.quantize(("fp8", "int4"))
    assert set(proj.state_dict()) == {"weight", "bias"}
    sizes = proj.format_bytes()
    assert sizes[NATIVE] == 256 * 96 * 4
    assert sizes["fp8"] < sizes[NATIVE] / 3 and sizes["int4"] < sizes[NATIVE] / 5
    with pytest.raises(ValueError, match="unknown weight format 'fp4'"):
        proj.quantize(("fp4",))


def test_group_size_adapts_to_the_row_length():
    proj = Projection(96, 8, bias=False)  # 96 is not a multiple of 128: the largest even divisor below is 96
    proj.quantize(("int4",), int4_group_size=128)
    assert proj.formats["int4"].group_size == 96


def test_quantize_model_covers_every_projection_but_not_the_head():
    from adaptserve.model.config import get_preset
    from adaptserve.model.llama import LlamaForCausalLM

    model = LlamaForCausalLM(get_preset("tiny"), 64)
    totals = quantize_model(model, ("int4",), 32)
    projections = [m for m in model.modules() if isinstance(m, Projection)]
    assert len(projections) == 4 * model.arch.num_layers
    assert all("int4" in p.formats for p in projections)
    assert totals["int4"] < totals[NATIVE] / 5
    assert model.head_formats == {}
    hidden = torch.randn(3, model.arch.hidden_size)
    assert torch.equal(model.compute_logits(hidden, "int4"), model.compute_logits(hidden))


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_quantized_lm_head_runs_in_the_steps_precision(fmt):
    from adaptserve.model.config import get_preset
    from adaptserve.model.llama import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(get_preset("tiny"), 64)
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0, 0.05)
    plain = quantize_model(model, (fmt,), 32)
    hidden = torch.randn(3, model.arch.hidden_size)
    native = model.compute_logits(hidden)
    totals = quantize_model(LlamaForCausalLM(get_preset("tiny"), 64), (fmt,), 32, lm_head=True)
    model.quantize_head((fmt,), 32)
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    assert (
        totals[fmt] - plain[fmt] == model.head_formats[fmt].nbytes < head.numel() * head.element_size() / 1.9
    )
    low = model.compute_logits(hidden, fmt)
    assert low.dtype == torch.float32 and torch.equal(model.compute_logits(hidden), native)
    error = (low - native).norm() / native.norm()
    assert 0 < error < 0.15  # the head's copy really ran, and it is close
