"""``lincheck explain``: the derivation, corrected, with the user's shapes, as a Rich page.

The page restates the derivation (``docs/derivation.zh.md``, whose index typos it
fixes and says so), substitutes the user's N, D_in, D_out, and states what
each check does and what it costs at those sizes. It is Markdown rendered
by Rich (:func:`lincheck.report.explain_page`), in English or in Chinese,
the derivation's own language.
"""

from __future__ import annotations

from dataclasses import dataclass

from .precision import LAMBDA, Operand, parse, subject_bound

LANGUAGES = ("en", "zh")


@dataclass(frozen=True)
class Sizes:
    """The shapes and arithmetic the page is written for."""

    N: int
    D_in: int
    D_out: int
    bias: bool = True
    precision: str = "fp64"
    directions: int = 40
    layout: str = "out_in"

    @property
    def entries(self) -> int:
        """P: the entries of dX, dW and dB together, the parameters a check estimates."""
        return self.N * self.D_in + self.D_out * self.D_in + self.D_out * self.bias

    @property
    def full_passes(self) -> int:
        """Forward passes of a full grouped witness: two per column of X or W, two for B."""
        return 2 * (2 * self.D_in + self.bias)

    @property
    def directions_passes(self) -> float:
        """Forward passes' worth of the directions: K rows through the layer for X, K units
        of the batch for W, two passes of one row for B's slopes."""
        return self.directions / self.N + self.directions / self.D_out + 2 * self.bias / self.N

    def bound(self, tensor: str, k: int) -> tuple[str, str]:
        """(certain, statistical) tolerance over Σ|terms| for a sum of k terms, operands
        converted, as text: the certain tier's factor, and the statistical tier's for
        k terms of equal size whose sum cancels (|value| ≪ Σ|terms|)."""
        model = parse(self.precision)
        names = {"dX": ("dY", "W"), "dW": ("dY", "X"), "dB": ("dY",), "Y": ("X", "W")}[tensor]
        ops = tuple(Operand(model.operand(n), model.operand(n).bits < 53) for n in names)
        b = subject_bound(model, tensor, k, 1.0, 0.0, 0.0, 1.0 / k, ops, model.out)
        return tuple(  # type: ignore[return-value]
            "∞ (no bound)" if v == float("inf") else f"{float(v):.1e}"
            for v in (b.worst, b.statistical)
        )


def _numbers(s: Sizes) -> dict[str, str]:
    p = parse(s.precision)
    dX, dW, Y = s.bound("dX", s.D_out), s.bound("dW", s.N), s.bound("Y", s.D_in + s.bias)
    return {
        "N": f"{s.N:,}",
        "D_in": f"{s.D_in:,}",
        "D_out": f"{s.D_out:,}",
        "N1": f"{s.N - 1:,}",
        "Din1": f"{s.D_in - 1:,}",
        "Dout1": f"{s.D_out - 1:,}",
        "macs": f"{s.N * s.D_in * s.D_out:,}",
        "P": f"{s.entries:,}",
        "dense": f"{2 * s.entries:,}",
        "full": f"{s.full_passes:,}",
        "ratio": f"{2 * s.entries / s.full_passes:,.0f}",
        "K": str(s.directions),
        "dirs": f"{s.directions_passes:.2g}",
        "jacobian": _bytes(8 * s.entries * s.N * s.D_out),
        "prec": s.precision,
        "spec": p.spec.replace(",", ", "),  # wraps between keys, never inside one
        "u": f"{p.acc.c:.1e}",
        "lam": f"{LAMBDA:g}",
        "g_dX": dX[0],
        "g_dW": dW[0],
        "g_Y": Y[0],
        "s_dX": dX[1],
        "s_dW": dW[1],
        "s_Y": Y[1],
        "kY": f"{s.D_in + s.bias:,}",
        "bias_term": " + b[i]" if s.bias else "",
        "bias_matrix": " + B" if s.bias else "",
    }


_LAYOUT_NOTE = {
    "en": """
**Your W is stored as (D_in, D_out) = ({D_in}, {D_out})** (`--layout in_out`, as in \
`x @ w + b`). Below it is written as torch's (D_out, D_in), its transpose: your \
`w[j, i]` is `w[i, j]` here. In your layout Y = X W{bias_matrix}, dX = G Wᵀ and \
dW = Xᵀ G, of shape ({D_in}, {D_out}); lincheck reports dW's indices in your layout.
""",
    "zh": """
**你的 W 按 (D_in, D_out) = ({D_in}, {D_out}) 存储**(`--layout in_out`,即 `x @ w + b`)。\
下文按 torch 的 (D_out, D_in) 书写,即其转置:你的 `w[j, i]` 就是这里的 `w[i, j]`。\
按你的存储方式,Y = X W{bias_matrix},dX = G Wᵀ,dW = Xᵀ G,形状为 ({D_in}, {D_out});\
lincheck 按你的存储方式报告 dW 的下标。
""",
}


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


_EN = """\
# The linear layer, with your shapes

N = {N} samples, D_in = {D_in} input features, D_out = {D_out} output features, \
checked in {prec}: `{spec}` (each addition off by at most u = {u}).

| Array | Shape | Entry | Meaning |
|---|---|---|---|
| X | ({N}, {D_in}) | x[n, j] | feature j of sample n |
| W | ({D_out}, {D_in}) | w[i, j] | weight from input j to output i |
| B | ({D_out},) | b[i] | bias of output i |
| Y, G = ∂L/∂Y | ({N}, {D_out}) | y[n, i] | output i of sample n |
{layout_note}
## Forward

```
Y = X Wᵀ{bias_matrix}          ({N}×{D_in}) · ({D_in}×{D_out}) → ({N}×{D_out})
y[n, i] = Σ_j x[n, j] w[i, j]{bias_term}     j = 0 … {Din1}
```

One forward pass is {macs} multiply-adds.

## Backward (the chain rule, index by index)

y[n, k] depends on w[i, j] only when k = i, with ∂y[n, i]/∂w[i, j] = x[n, j]; \
on x[n, j] through every output k, with ∂y[n, k]/∂x[n, j] = w[k, j]; and on \
b[k] with derivative 1. So, with G = ∂L/∂Y:

```
dW[i, j] = Σ_n G[n, i] x[n, j]     dW = Gᵀ X     ({D_out}×{N})·({N}×{D_in})
dX[n, j] = Σ_i G[n, i] w[i, j]     dX = G W      ({N}×{D_out})·({D_out}×{D_in})
dB[i]    = Σ_n G[n, i]             dB = Σₙ G     sum over the batch, axis 0
```

Each entry of dW and dB is a sum of {N} terms (n = 0 … {N1}); each entry of dX \
a sum of {D_out} terms (i = 0 … {Dout1}).

**Corrections to the original derivation.** Its forward sum is written over \
`i = 1 … D_in` with a stray index `p`; the sum runs over `j`, from 1 to D_in, \
and `i` is the fixed output. Its bias gradient sums over `i = 1 … N`; the sum \
runs over the batch index `n`.

## The numerical witness

Finite differences need a scalar, and only G is given. The surrogate loss

```
L(X, W, B) = Σ_n Σ_i G[n, i] · y[n, i]
```

has ∂L/∂Y = G exactly, so its gradients are the dX, dW, dB above. L is linear \
in every single entry of X, W and B, so a central difference \
(L(θ + h) − L(θ − h)) / 2h has no truncation error at all: its only error is \
rounding, which falls as h grows. lincheck takes h about 1000 times past the \
point where cancellation stops mattering, entry by entry, and bounds what is \
left.

## What each check does, and what it costs here

- **full** (every entry): perturb a whole column of X (or of W) in one \
forward pass and read each row's share of L: {full} forward passes in all, \
instead of {dense} one entry at a time ({ratio}× fewer), with each estimate \
still a true central difference. A Jacobian, as torch.autograd.gradcheck \
builds, would take {jacobian}.
- **directions** K = {K}: compare the derivative of L along random rank-one \
±1 directions V = a bᵀ (a, b random signs) with ⟨∇L, V⟩; the forward pass \
gives it from K rows of random signs pushed through the layer (for X) or K \
units of random sign weights (for W): the work of {dirs} forward passes. A \
single wrong entry larger than the smallest change the report says is caught \
is always caught; any error whose largest entry is, with probability at least \
1 − (3/4)ᴷ.
- **sample** K: K random entries per tensor, each from its own row or output \
unit.

Your gradients are always compared with the float64 reference at every entry \
(about one forward pass).

## The verdict

An entry fails for certain when |subject − oracle| exceeds the rigorous bound of \
the arithmetic, whatever the summation order: each term passes through its \
operands' conversions, a product, at most k − 1 additions and the result's \
rounding, so the bound is ((1 + e)(1 + c)^(k−1)(1 + u_out) − 1) · Σ|terms| \
(Higham, §3.1). It fails *statistically* when the error exceeds what rounding \
plausibly produces: λ = {lam} times the √k scale of Higham and Mary (2019) for \
the errors that average out, plus a rigorous allowance, proportional to the \
value, for those that do not. Here, in {prec}, per Σ|terms|:

| Tensor | Terms k | certain | statistical (cancelling sums) |
|---|---|---|---|
| dX | {D_out} | {g_dX} | {s_dX} |
| dW, dB | {N} | {g_dW} | {s_dW} |
| Y | {kY} | {g_Y} | {s_Y} |

A check whose tolerance is at least half of every entry could not tell a \
zero or halved gradient from the right one: it is *inconclusive*, not a pass. \
There is no tolerance to tune: a larger error is a wrong gradient.
"""

_ZH = """\
# 线性层:代入你的形状

N = {N} 个样本,D_in = {D_in} 个输入特征,D_out = {D_out} 个输出特征,\
按 {prec} 检查:`{spec}`(每次加法的相对误差至多 u = {u})。

| 数组 | 形状 | 元素 | 含义 |
|---|---|---|---|
| X | ({N}, {D_in}) | x[n, j] | 第 n 个样本的第 j 个输入特征 |
| W | ({D_out}, {D_in}) | w[i, j] | 从输入 j 到输出 i 的权重 |
| B | ({D_out},) | b[i] | 第 i 个输出的偏置 |
| Y, G = ∂L/∂Y | ({N}, {D_out}) | y[n, i] | 第 n 个样本的第 i 个输出 |
{layout_note}
## 正向传播

```
Y = X Wᵀ{bias_matrix}          ({N}×{D_in}) · ({D_in}×{D_out}) → ({N}×{D_out})
y[n, i] = Σ_j x[n, j] w[i, j]{bias_term}     j = 0 … {Din1}
```

一次正向传播需要 {macs} 次乘加。

## 反向传播(逐个下标应用链式法则)

只有当 k = i 时 y[n, k] 才依赖 w[i, j],且 ∂y[n, i]/∂w[i, j] = x[n, j];\
x[n, j] 通过每个输出 k 影响 y,∂y[n, k]/∂x[n, j] = w[k, j];b[k] 的导数为 1。\
记 G = ∂L/∂Y,于是:

```
dW[i, j] = Σ_n G[n, i] x[n, j]     dW = Gᵀ X     ({D_out}×{N})·({N}×{D_in})
dX[n, j] = Σ_i G[n, i] w[i, j]     dX = G W      ({N}×{D_out})·({D_out}×{D_in})
dB[i]    = Σ_n G[n, i]             dB = Σₙ G     沿批次维度(第 0 维)求和
```

dW 与 dB 的每个元素是 {N} 项之和(n = 0 … {N1});dX 的每个元素是 {D_out} 项之和\
(i = 0 … {Dout1})。

**对原推导的更正。** 原文正向传播的求和写成 `i = 1 … D_in`,还列出了多余的下标 \
`p`;实际求和下标是 `j`,从 1 到 D_in,`i` 是固定的输出下标。原文偏置梯度的求和写成 \
`i = 1 … N`;实际是对批次下标 `n` 求和。

## 数值见证

有限差分需要一个标量,而我们只有 G。代理损失

```
L(X, W, B) = Σ_n Σ_i G[n, i] · y[n, i]
```

满足 ∂L/∂Y = G,所以它的梯度正是上面的 dX、dW、dB。L 对 X、W、B 的每一个元素都是\
线性的,因此中心差分 (L(θ + h) − L(θ − h)) / 2h 没有截断误差:唯一的误差来自舍入,\
并且随 h 增大而减小。lincheck 逐元素地把 h 取在抵消误差不再重要之处再大约 1000 倍,\
并给出剩余误差的严格上界。

## 各项检查做什么、在这里花多少

- **full**(每个元素):一次正向传播扰动 X(或 W)的一整列,读取每一行对 L 的贡献:\
共 {full} 次正向传播,而逐元素需要 {dense} 次(少 {ratio} 倍),每个估计仍是真正的\
中心差分。像 torch.autograd.gradcheck 那样构造雅可比矩阵需要 {jacobian}。
- **directions** K = {K}:沿随机秩一 ±1 方向 V = a bᵀ(a、b 为随机符号)比较 L 的方向\
导数与 ⟨∇L, V⟩;方向导数由正向传播给出:K 行随机符号输入(对 X)或 K 个权重为随机\
符号的输出单元(对 W),工作量相当于 {dirs} 次正向传播。单个元素的错误只要超过报告中\
"一定能发现的最小改变",就一定被发现;最大元素超过它的任何误差,被发现的概率至少为\
1 − (3/4)ᴷ。
- **sample** K:每个张量随机取 K 个元素,各自用所在的行或输出单元估计。

你的梯度总是在每个元素上与 float64 参考值比较(约一次正向传播)。

## 判定

当 |被检值 − 参照值| 超过该算术的严格误差界(与求和顺序无关)时,判定为**确定**错误:\
每一项经过操作数转换、一次乘法、至多 k − 1 次加法和结果舍入,误差界为 \
((1 + e)(1 + c)^(k−1)(1 + u_out) − 1) · Σ|各项|(Higham,§3.1)。当误差超过舍入\
可能产生的范围时判定为**统计**错误:对能相互抵消的误差取 Higham 与 Mary(2019)√k \
尺度的 λ = {lam} 倍,对不能抵消的部分取与数值成比例的严格上界。在 {prec} 下(相对 Σ|各项|):

| 张量 | 项数 k | 确定 | 统计(相互抵消的和) |
|---|---|---|---|
| dX | {D_out} | {g_dX} | {s_dX} |
| dW, dB | {N} | {g_dW} | {s_dW} |
| Y | {kY} | {g_Y} | {s_Y} |

若容差至少是每个元素的一半,检查就无法区分零梯度或减半的梯度与正确梯度:\
结论为**无法判定**,而不是通过。没有需要调节的容差:更大的误差就是错误的梯度。
"""


def text(sizes: Sizes, lang: str = "en") -> str:
    """The page as Markdown, the sizes substituted."""
    if lang not in LANGUAGES:
        raise ValueError(f"lang must be one of {LANGUAGES}, not {lang!r}")
    numbers = _numbers(sizes)
    note = _LAYOUT_NOTE[lang].format(**numbers) if sizes.layout == "in_out" else ""
    return (_EN if lang == "en" else _ZH).format(**numbers, layout_note=note)
