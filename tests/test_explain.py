"""lincheck explain: the derivation with the user's shapes, in English and Chinese."""

import numpy as np
import pytest
from rich.cells import cell_len
from rich.console import Console
from typer.testing import CliRunner

from lincheck.cli import app
from lincheck.explain import Sizes, text
from lincheck.report import explain_page

runner = CliRunner()


def rendered(sizes, lang, width=80):
    console = Console(width=width, record=True, color_system=None, file=open("/dev/null", "w"))
    console.print(explain_page(sizes, lang))
    console.file.close()
    return console.export_text()


@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("width", [80, 200])
def test_the_page_fits_the_width(lang, width):
    out = rendered(Sizes(N=1024, D_in=4096, D_out=1000, precision="bf16"), lang, width)
    assert max(cell_len(line) for line in out.splitlines()) <= width
    assert "(1,024×4,096) · (4,096×1,000) → (1,024×1,000)" in out


def test_the_numbers_are_those_of_the_shapes():
    s = Sizes(N=32, D_in=64, D_out=16)
    page = " ".join(rendered(s, "en").split())
    assert "N = 32 samples, D_in = 64 input features, D_out = 16 output features" in page
    assert "(32×64) · (64×16) → (32×16)" in page
    assert f"{32 * 64 * 16:,} multiply-adds" in page
    P = 32 * 64 + 16 * 64 + 16
    assert f"{2 * (2 * 64 + 1)} forward passes in all, instead of {2 * P:,}" in page
    # 40 rows through the layer for X, 40 of its 16 units' worth for W, two passes of a row
    assert f"the work of {40 / 32 + 40 / 16 + 2 / 32:.2g} forward passes" in page
    u = 2.0**-53
    for tensor, k in (("dX", 16), ("dW, dB", 32), ("Y", 65)):
        assert f"{tensor} {k} {k * u / (1 - k * u):.1e}" in page
    assert "the sum runs over j, from 1 to D_in" in page  # the derivation's typo, corrected


def test_no_bias_and_no_bound():
    s = Sizes(N=2**21, D_in=8, D_out=4, bias=False, precision="fp16-acc16")
    page = " ".join(text(s).split())
    assert "+ b[i]" not in page and "Y = X Wᵀ " in page
    assert f"{2 * 2 * 8} forward passes in all" in page
    # (1 + 2⁻¹¹)^(2²¹) overflows float64: float16 sums of 2²¹ terms have no bound at all.
    assert "dW, dB | 2,097,152 | ∞ (no bound)" in page
    assert "acc=fp16" in page and "x=fp16" in page  # the model is spelled out


def test_float32_accumulation_bounds_long_float16_sums():
    page = " ".join(text(Sizes(N=4096, D_in=8, D_out=4, precision="fp16")).split())
    assert "acc=fp32-rz" in page
    certain = page.split("dW, dB | 4,096 | ")[1].split(" ")[0]
    assert float(certain) < 0.01  # (1 + 2⁻²³)^4095 (1 + 2⁻¹¹)³ − 1: a few float16 units


def test_chinese_page():
    page = " ".join(rendered(Sizes(N=32, D_in=64, D_out=16), "zh").split())
    assert "代理损失" in page and "258 次正向传播" in page and "链式法则" in page
    assert "实际求和下标是 j" in page


def test_cli_explain_reads_shapes_from_a_dump(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "dump"
    d.mkdir()
    for name, shape in (("X", (5, 7)), ("W", (3, 7)), ("dY", (5, 3)), ("dW", (3, 7))):
        np.save(d / f"{name}.npy", rng.standard_normal(shape).astype(np.float32))
    result = runner.invoke(app, ["explain", str(d)])
    assert result.exit_code == 0, result.output
    page = " ".join(result.stdout.split())
    assert "N = 5 samples, D_in = 7 input features, D_out = 3 output features" in page
    assert "checked in fp32" in page and "+ b[i]" not in page
    zh = runner.invoke(app, ["explain", "--n", "8", "--din", "4", "--dout", "2", "--lang", "zh"])
    assert zh.exit_code == 0 and "N = 8 个样本" in zh.stdout
    bad = runner.invoke(app, ["explain", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "missing" in bad.stderr


def test_the_page_states_the_model_it_bounds():
    """explain --precision bf16 printed float32's u = 6.0e-08 as if that were bfloat16's:
    the page now spells out the model (operands, accumulator, result) its bounds are for."""
    page = " ".join(text(Sizes(N=32, D_in=64, D_out=16, precision="bf16")).split())
    assert "x=bf16, w=bf16, dy=bf16" in page and "out=bf16" in page and "acc=fp32-rz" in page
    assert "u = 6.0e-08" not in page
    custom = " ".join(text(Sizes(N=32, D_in=64, D_out=16, precision="fp8,acc=14bit/128")).split())
    assert "x=e4m3" in custom and "acc=14bit/128" in custom
    from lincheck.precision import parse

    spec = page.split("checked in bf16: ")[1].split(" (each addition")[0].strip("`")
    assert parse(spec).spec == parse("bf16").spec  # as printed (wrapping between keys)
