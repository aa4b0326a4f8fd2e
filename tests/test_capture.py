"""lincheck.torch.capture on real torch models: every linear call recorded, checked by verify.

The oracles: torch's own ``.grad`` (the sum of a module's per-call gradients,
and the parameters left as they were), the shapes of each call, and a custom
linear with a planted bug that verify must fail, and name, among correct layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lincheck import batch
from lincheck.cli import app
from lincheck.errors import InputError, LincheckError

torch = pytest.importorskip("torch", reason="torch is not installed (pip install '.[test]')")
capture = pytest.importorskip("lincheck.torch").capture


def custom_linear(bias_gradient):
    """An ``nn.Linear`` whose forward and backward are a custom ``autograd.Function``, with dB
    computed by ``bias_gradient(G2)`` from the upstream gradient flattened to (N, D_out)."""

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, X, W, B):
            ctx.save_for_backward(X, W)
            return X @ W.T + B

        @staticmethod
        def backward(ctx, G):
            X, W = ctx.saved_tensors
            X2, G2 = X.reshape(-1, X.shape[-1]), G.reshape(-1, G.shape[-1])
            return G @ W, G2.T @ X2, bias_gradient(G2)

    class CustomLinear(torch.nn.Linear):
        def forward(self, X):
            return Function.apply(X, self.weight, self.bias)

    return CustomLinear


# Planted bugs: dB averaged over the batch instead of summed; dB 10% short.
BrokenLinear = custom_linear(lambda G2: G2.mean(0))
ShortBiasLinear = custom_linear(lambda G2: 0.9 * G2.sum(0))


class MLP(torch.nn.Module):
    """Three linears, one of them broken; ``shared`` is called twice per forward."""

    def __init__(self, broken: bool):
        super().__init__()
        self.inp = torch.nn.Linear(12, 24)
        self.shared = torch.nn.Linear(24, 24, bias=False)
        self.mid = (BrokenLinear if broken else torch.nn.Linear)(24, 24)
        self.out = torch.nn.Linear(24, 5)

    def forward(self, X):
        h = torch.tanh(self.inp(X))
        h = torch.relu(self.shared(h))
        h = torch.tanh(self.mid(h))
        h = self.shared(h)
        return self.out(h)


def _verify(*args: str):
    result = CliRunner().invoke(app, ["verify", *args, "--json", "-", "--quiet", "--jobs", "1"])
    return result, json.loads(result.stdout) if result.stdout.strip() else None


def _by_case(report) -> dict:
    return {Path(c["case"]).name.removesuffix(".safetensors"): c for c in report["cases"]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mlp_each_call_is_a_case_and_verifies(tmp_path, dtype):
    torch.manual_seed(0)
    model = MLP(broken=False).to(dtype)
    X = torch.randn(3, 7, 12, dtype=dtype)  # leading batch dims
    with capture(model, tmp_path / "dumps", format="npy") as cap:
        model(X).square().sum().backward()
    names = sorted(p.name for p in cap.paths)
    assert names == ["inp", "mid", "out", "shared@1", "shared@2"]
    assert cap.missing == []
    calls = {c.name(2 if c.module == "shared" else 1): c for c in cap.calls}
    assert calls["inp"].arrays["X"].shape == (3, 7, 12)
    assert "dX" not in calls["inp"].arrays  # the model's input needs no gradient
    assert calls["out"].arrays["dY"].shape == (3, 7, 5)
    # A module called twice: its .grad is the sum of the two calls' own gradients.
    dW = calls["shared@1"].arrays["dW"].astype(np.float64) + calls["shared@2"].arrays["dW"]
    np.testing.assert_allclose(dW, model.shared.weight.grad.double().numpy(), rtol=1e-5, atol=0)
    # The parameters are the model's own again, and train as before.
    assert isinstance(model.shared.weight, torch.nn.Parameter)
    assert all(p.grad is not None for p in model.parameters())

    result, report = _verify(str(tmp_path / "dumps"))
    assert result.exit_code == 0, result.output
    assert report["passed"] and len(report["cases"]) == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_broken_custom_linear_is_found_and_named(tmp_path, dtype):
    """Among correct layers of one dtype, the custom linear that averages dB fails, alone,
    with its hint; no correct layer is a false alarm in any dtype."""
    torch.manual_seed(1)
    model = MLP(broken=True).to(dtype)
    with capture(model, tmp_path / "dumps"):
        model(torch.randn(256, 12, dtype=dtype)).float().square().mean().backward()
    result, report = _verify(str(tmp_path / "dumps"))
    assert result.exit_code == 1, result.output
    cases = _by_case(report)
    failed = [name for name, c in cases.items() if not c["passed"]]
    assert failed == ["mid"], failed
    checks = {
        c["tensor"]: c for c in cases["mid"]["report"]["checks"] if c["subject"] == "supplied"
    }
    assert not checks["dB"]["passed"] and checks["dW"]["passed"] and checks["dX"]["passed"]
    codes = {h["code"] for h in cases["mid"]["report"]["hints"]}
    assert "mean_instead_of_sum" in codes, codes


def test_transformer_encoder(tmp_path):
    torch.manual_seed(2)
    layer = torch.nn.TransformerEncoderLayer(
        d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
    )
    model = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    with capture(model, tmp_path / "dumps", format="npy") as cap:
        model(torch.randn(4, 6, 16)).square().mean().backward()
    names = sorted(p.name for p in cap.paths)
    # self_attn.out_proj is an nn.Linear, but attention reads its weight directly, never
    # calling it: it has no call to record.
    assert names == [f"layers.{i}.linear{k}" for i in (0, 1) for k in (1, 2)]
    result, report = _verify(str(tmp_path / "dumps"))
    assert result.exit_code == 0, result.output


def test_no_backward_and_no_linear_are_errors(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(LincheckError, match="no recorded call had a backward pass"):
        with capture(model, tmp_path / "a", format="npy"):
            pass
    with pytest.raises(LincheckError, match="none of the 1 recorded calls had a backward"):
        with capture(model, tmp_path / "b", format="npy"):
            model(torch.randn(2, 3))
    with pytest.raises(LincheckError, match="no nn.Linear"):
        with capture(torch.nn.ReLU(), tmp_path / "c", format="npy"):
            pass
    assert not any(tmp_path.iterdir())


def test_existing_cases_are_kept_without_force(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))

    def step():
        with capture(model, tmp_path, format="npy"):
            model(torch.randn(2, 3)).sum().backward()

    step()
    before = (tmp_path / "0" / "X.npy").read_bytes()
    with pytest.raises(InputError, match="already exists; nothing was written"):
        step()
    assert (tmp_path / "0" / "X.npy").read_bytes() == before


def test_parameters_restored_when_forward_raises(tmp_path):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(RuntimeError):
        with capture(model, tmp_path, format="npy"):
            model(torch.randn(2, 4))  # wrong D_in: F.linear raises inside the call
    assert isinstance(model.weight, torch.nn.Parameter)
    assert isinstance(model.bias, torch.nn.Parameter)


class LoRALinear(torch.nn.Module):
    """A frozen base weight plus a trainable low-rank update: Y = X (W₀ + U V)ᵀ + B."""

    def __init__(self, D_in, D_out, rank=2):
        super().__init__()
        self.base = torch.nn.Linear(D_in, D_out)
        self.base.weight.requires_grad_(False)
        self.U = torch.nn.Parameter(torch.randn(D_out, rank) * 0.1)
        self.V = torch.nn.Parameter(torch.randn(rank, D_in) * 0.1)

    def forward(self, X):
        return torch.nn.functional.linear(X, self.base.weight + self.U @ self.V, self.base.bias)


def test_linear_like_module_with_an_accessor(tmp_path):
    """A LoRA linear is checked through its effective weight: dX, dB and Y (its dW is no
    tensor torch computes); its base nn.Linear is never called, so it has no case."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), LoRALinear(8, 4))
    effective = {LoRALinear: lambda m: (m.base.weight + m.U @ m.V, m.base.bias)}
    with capture(model, tmp_path, format="npy", linear_like=effective) as cap:
        model(torch.randn(10, 6)).square().sum().backward()
    assert sorted(p.name for p in cap.paths) == ["0", "2"]
    lora = next(c for c in cap.calls if c.module == "2").arrays
    assert {"X", "W", "B", "Y", "dY", "dX", "dB"} == set(lora)
    W = (model[2].base.weight + model[2].U @ model[2].V).detach().numpy()
    np.testing.assert_array_equal(lora["W"], W)
    np.testing.assert_array_equal(lora["dB"], model[2].base.bias.grad.numpy())
    result, report = _verify(str(tmp_path))
    assert result.exit_code == 0, result.output


def test_modules_chooses_what_is_recorded(tmp_path):
    torch.manual_seed(4)
    model = MLP(broken=True)
    with capture(model, tmp_path, format="npy", modules=["inp", "out"]) as cap:
        model(torch.randn(4, 12)).sum().backward()
    assert sorted(p.name for p in cap.paths) == ["inp", "out"]


def test_bfloat16_model_and_autocast_verify_without_precision(tmp_path, monkeypatch):
    """bfloat16 parameters (stored as BF16), and float32 parameters under CPU autocast to
    bfloat16 (stored as F32, the arithmetic recorded): both verify with no --precision."""
    torch.manual_seed(5)
    model = MLP(broken=False).to(torch.bfloat16)
    with capture(model, tmp_path / "bf16"):
        model(torch.randn(64, 12, dtype=torch.bfloat16)).float().square().sum().backward()
    result, report = _verify(str(tmp_path / "bf16"))
    assert result.exit_code == 0, result.output
    checks = report["cases"][0]["report"]["checks"]
    # torch sums dB in float32: the record says so (the bf16 preset alone would let a dB
    # 20% too large pass), and each case's report says where its arithmetic came from.
    assert {c["precision"] for c in checks if c["subject"] == "supplied"} == {"bf16,reduce=fp32"}
    arithmetic = {"precision": "bf16,reduce=fp32", "from": "metadata"}
    assert all(case["report"]["arithmetic"] == arithmetic for case in report["cases"])
    log = tmp_path / "bf16.jsonl"
    _verify(str(tmp_path / "bf16"), "--jsonl", str(log))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records and all(r["report"]["arithmetic"] == arithmetic for r in records)
    with monkeypatch.context() as patch:  # every case read back from its record, none run
        patch.setattr(batch, "check_case", lambda *args: pytest.fail("checked again"))
        again, resumed = _verify(str(tmp_path / "bf16"), "--resume", str(log))
    assert again.exit_code == 0
    assert all(c["report"]["arithmetic"] == arithmetic for c in resumed["cases"])
    _, report = _verify(str(tmp_path / "bf16"), "--precision", "bf16")
    given = {"precision": "bf16", "from": "--precision"}  # the option wins
    assert report["cases"][0]["report"]["arithmetic"] == given

    model = MLP(broken=False)
    with capture(model, tmp_path / "autocast"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randn(64, 12)).float().square().sum()
        loss.backward()
    result, report = _verify(str(tmp_path / "autocast"))
    assert result.exit_code == 0, result.output
    # The same dump held to float32's arithmetic fails: the record is what made it pass.
    result, report = _verify(str(tmp_path / "autocast"), "--precision", "fp32")
    assert result.exit_code == 1, result.output

    with pytest.raises(InputError, match="use format='safetensors'"):
        with capture(model, tmp_path / "npy", format="npy"):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(torch.randn(4, 12)).float().sum()
            loss.backward()


def test_npy_refuses_bfloat16_before_writing(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)).to(torch.bfloat16)
    with pytest.raises(InputError, match="a .npy folder cannot record; use format='safetensors'"):
        with capture(model, tmp_path, format="npy"):
            model(torch.randn(4, 3, dtype=torch.bfloat16)).float().sum().backward()
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capture_changes_nothing_the_model_computes(tmp_path, dtype):
    """The loss and every .grad, bit for bit, with and without capture (the aliases pass the
    gradients through unchanged and add no arithmetic)."""

    def step(record: bool):
        torch.manual_seed(6)
        model = MLP(broken=False).to(dtype)
        X = torch.randn(3, 5, 12, dtype=dtype)
        if record:
            with capture(model, tmp_path / str(dtype)):
                loss = model(X).float().square().mean()
                loss.backward()
        else:
            loss = model(X).float().square().mean()
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = step(False)
    loss_captured, grads_captured = step(True)
    assert torch.equal(loss, loss_captured)
    assert grads.keys() == grads_captured.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_captured[name]), name


def test_the_arithmetic_recorded_for_cuda_and_autocast():
    """The rule capture records (exercised on CPU: TF32 is a flag torch keeps without a GPU)."""
    from lincheck.capture import _arithmetic

    cuda = torch.device("cuda")
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert _arithmetic(cuda, torch.float32) == "tf32"
        assert _arithmetic(torch.device("cpu"), torch.float32) is None  # TF32 is CUDA's
        torch.backends.cuda.matmul.allow_tf32 = False
        assert _arithmetic(cuda, torch.float32) is None
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _arithmetic(torch.device("cpu"), torch.float32) == "bf16,reduce=fp32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_capture_on_cuda_verifies(tmp_path):  # pragma: no cover - needs a GPU
    torch.manual_seed(7)
    model = MLP(broken=False).cuda()
    with capture(model, tmp_path):
        model(torch.randn(64, 12, device="cuda")).square().sum().backward()
    result, report = _verify(str(tmp_path))
    assert result.exit_code == 0, result.output


def test_bfloat16_db_ten_percent_short_fails(tmp_path):
    torch.manual_seed(8)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), ShortBiasLinear(16, 10))
    model = model.to(torch.bfloat16)
    X, target = torch.randn(64, 8, dtype=torch.bfloat16), torch.randint(0, 10, (64,))
    with capture(model, tmp_path):
        torch.nn.functional.cross_entropy(model(X).float(), target).backward()
    result, report = _verify(str(tmp_path))
    assert result.exit_code == 1, result.output
    assert [n for n, c in _by_case(report).items() if not c["passed"]] == ["2"]


def test_a_partial_backward_pass_first_keeps_one_consistent_set(tmp_path):
    """A gradient penalty's autograd.grad with respect to the input (dY and dX, no dW) before
    the loss's backward: each case holds the gradients of one pass."""
    torch.manual_seed(9)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    X = torch.randn(32, 8, requires_grad=True)
    with capture(model, tmp_path):
        out = model(X)
        torch.autograd.grad(out.sum(), X, retain_graph=True)
        (out**2).mean().backward()
    result, _ = _verify(str(tmp_path))
    assert result.exit_code == 0, result.output


def test_the_users_forward_hooks_do_not_change_what_is_recorded(tmp_path):
    torch.manual_seed(10)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    model[0].register_forward_hook(lambda module, args, out: out * 2)
    with capture(model, tmp_path):
        with capture(model, tmp_path / "inner"):  # nested: the parameters come back too
            model(torch.randn(10, 8)).sum().backward()
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
    assert all(type(p) is torch.nn.Parameter for p in model[0]._parameters.values())
    result, _ = _verify(str(tmp_path / "inner"))
    assert result.exit_code == 0, result.output


class KeywordCalls(torch.nn.Module):
    """Linears called with their input by keyword, and two names that sanitise alike."""

    def __init__(self):
        super().__init__()
        self.heads = torch.nn.ModuleDict(
            {
                "a b": torch.nn.Linear(4, 4),
                "a_b": torch.nn.Linear(4, 4),
                "A_B": torch.nn.Linear(4, 3),
            }
        )

    def forward(self, X):
        h = self.heads["a b"](input=X)
        h = self.heads["a_b"](input=torch.tanh(h))
        return self.heads["A_B"](h)


def test_keyword_calls_and_colliding_names_are_each_a_case(tmp_path):
    torch.manual_seed(0)
    model = KeywordCalls().double()
    X = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    with capture(model, tmp_path) as captured:
        model(X).square().sum().backward()
    # Three modules, three files, each naming the module it came from.
    assert len(captured.paths) == len({p.name.lower() for p in captured.paths}) == 3
    from lincheck import arrays

    for path in captured.paths:
        loaded = arrays.load(path)
        module = model.heads[loaded.metadata["lincheck.module"].removeprefix("heads.")]
        assert np.array_equal(loaded.arrays["W"], module.weight.detach().numpy())
        # dX by keyword was caught: its own gradient, not the sum of another call's.
        assert "dX" in loaded.arrays and "dW" in loaded.arrays
    first = arrays.load(tmp_path / "heads.a_b.safetensors").arrays
    assert np.array_equal(first["X"], X.detach().numpy())
    assert np.array_equal(first["dX"], X.grad.numpy())  # X feeds only the first call
    result, report = _verify(str(tmp_path))
    assert result.exit_code == 0 and report["passed"], result.output


def test_a_file_where_the_folder_should_be_is_refused(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    (tmp_path / "dumps").write_text("notes")
    with pytest.raises(InputError, match="is a file, not a folder"):
        with capture(model, tmp_path / "dumps"):
            model(torch.randn(2, 3)).sum().backward()
    assert (tmp_path / "dumps").read_text() == "notes"
    with pytest.raises(InputError, match="cannot create the folder"):  # a parent is a file
        with capture(model, tmp_path / "dumps" / "run1"):
            model(torch.randn(2, 3)).sum().backward()
