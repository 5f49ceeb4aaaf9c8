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
