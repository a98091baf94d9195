"""Self-tests of the brute-force references in ``reference`` and ``reference_curvature``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import reference as ref
import reference_curvature as curv

CASES = [(kind, loss) for kind in ("mlp", "cnn") for loss in ("ce", "mse")]
BUILDERS = {"mlp": ref.mlp, "cnn": ref.cnn}
WEIGHT_DECAY = 0.3


def setup(kind: str, loss: str, seed: int = 0, n: int = 5):
    """Model and batch of one case."""
    return BUILDERS[kind](seed), ref.batch(kind, loss, n, seed + 100)


def linear_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 3)).double()


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in ref.trainable(model)])


# --- builders and gradients ------------------------------------------------------------------


@pytest.mark.parametrize("kind, loss", CASES)
def test_builders_are_deterministic_float64_and_losses_match(kind, loss):
    model, (x, y, loss_fn, per_sample) = setup(kind, loss)
    assert isinstance(model, nn.Sequential)
    assert torch.equal(flat_params(model), flat_params(BUILDERS[kind](0)))
    assert torch.equal(x, ref.batch(kind, loss, 5, 100).inputs)
    assert x.dtype == torch.float64 and all(p.dtype == torch.float64 for p in model.parameters())
    out = model(x)
    assert out.shape == (5, 3)
    assert torch.allclose(per_sample(out, y).mean(), loss_fn(out, y))


@pytest.mark.parametrize("kind, loss", CASES)
@pytest.mark.parametrize("decay", [0.0, WEIGHT_DECAY])
def test_per_sample_loop_averages_to_batch_gradient(kind, loss, decay):
    model, (x, y, loss_fn, per_sample) = setup(kind, loss)
    reg = ref.weights(model)
    grads = ref.per_sample_gradients(model, per_sample, x, y, reg, decay)
    batch_grad = ref.batch_gradient(model, loss_fn, x, y, reg, decay)
    for g, p, bg in zip(grads, ref.trainable(model), batch_grad):
        assert g.shape == (5, *p.shape)
        assert torch.allclose(g.mean(0), bg, atol=1e-12)
    losses = ref.individual_losses(model, per_sample, x, y, reg, decay)
    total = loss_fn(model(x), y) + ref.regularizer(reg, decay)
    assert torch.allclose(losses.mean(), total)


def test_frozen_parameters_are_skipped():
    model, (x, y, _, per_sample) = setup("mlp", "ce")
    model[0].weight.requires_grad_(False)
    grads = ref.per_sample_gradients(model, per_sample, x, y)
    assert [g.shape[1:] for g in grads] == [p.shape for p in ref.trainable(model)]
    assert len(grads) == 5


# --- gradient statistics: the definitions against expanded algebraic forms ------------------


@pytest.mark.parametrize("kind, loss", CASES)
def test_gradient_tests_match_expanded_forms(kind, loss):
    model, (x, y, loss_fn, per_sample) = setup(kind, loss, n=7)
    G = ref.flatten(ref.per_sample_gradients(model, per_sample, x, y))
    n, g = G.shape[0], G.mean(0)
    sq = g.dot(g).item()
    norms, dots = (G**2).sum(1), G @ g
    expected_norm = ((norms.sum() - n * sq) / (n * (n - 1) * sq)).sqrt().item()
    expected_inner = (((dots**2).sum() - n * sq**2) / (n * (n - 1) * sq**2)).sqrt().item()
    expected_ortho = ((norms.sum() - (dots**2).sum() / sq) / (n * (n - 1) * sq)).sqrt().item()
    assert ref.norm_test(G) == pytest.approx(expected_norm, rel=1e-10)
    assert ref.inner_test(G) == pytest.approx(expected_inner, rel=1e-10)
    assert ref.ortho_test(G) == pytest.approx(expected_ortho, rel=1e-10)

    second = (G**2).mean(0)
    gsnr = (g**2 / (second - g**2 + 1e-5)).mean().item()
    assert ref.mean_gsnr(G) == pytest.approx(gsnr, rel=1e-10)
    variance = torch.tensor([np.var(G[:, d].numpy(), ddof=1) for d in range(G.shape[1])])
    eb = 1 - n * (g**2 / (variance + 1e-5)).mean().item()
    assert ref.early_stopping(G) == pytest.approx(eb, rel=1e-10)
    batch_loss = loss_fn(model(x), y).item()
    cabs = 0.1 * (n - 1) * variance.sum().item() / (n * batch_loss)
    assert ref.cabs(G, batch_loss, lr=0.1) == pytest.approx(cabs, rel=1e-10)


def test_gradient_tests_on_constructed_gradients():
    g = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    parallel = torch.stack([c * g for c in (0.5, 1.0, 1.5)])
    assert ref.ortho_test(parallel) == pytest.approx(0.0, abs=1e-12)
    identical = g.expand(4, 3).clone()
    assert ref.norm_test(identical) == ref.inner_test(identical) == 0.0
    # inner test of scalar multiples c_i g: sqrt(var(c) / N) with the unbiased variance
    expected = np.sqrt(np.var([0.5, 1.0, 1.5], ddof=1) / 3)
    assert ref.inner_test(parallel) == pytest.approx(expected, rel=1e-12)


# --- curvature ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, loss", CASES)
def test_dense_hessian_is_symmetric_and_matches_functional_hessian(kind, loss):
    model, (x, y, loss_fn, _) = setup(kind, loss)
    reg = ref.weights(model)
    H = curv.hessian(model, loss_fn, x, y, reg, WEIGHT_DECAY)
    assert torch.allclose(H, H.T, atol=1e-12)

    params = ref.trainable(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    reg_names = {n for n in names if n.endswith("weight")}

    def total_loss(flat):
        values = dict(zip(names, curv.unflatten(flat, params)))
        out = torch.func.functional_call(model, values, (x,))
        return loss_fn(out, y) + 0.5 * WEIGHT_DECAY * sum((values[n] ** 2).sum() for n in reg_names)

    expected = torch.autograd.functional.hessian(total_loss, flat_params(model))
    assert torch.allclose(H, expected, atol=1e-10)


@pytest.mark.parametrize("kind, loss", CASES)
def test_hessian_diagonal_hvp_and_trace_agree_with_dense(kind, loss):
    model, (x, y, loss_fn, _) = setup(kind, loss, seed=1)
    reg = ref.weights(model)
    H = curv.hessian(model, loss_fn, x, y, reg, WEIGHT_DECAY)
    diag = curv.hessian_diagonal(model, loss_fn, x, y, reg, WEIGHT_DECAY)
    assert torch.allclose(torch.cat([d.reshape(-1) for d in diag]), H.diagonal(), atol=1e-12)
    sizes = [p.numel() for p in ref.trainable(model)]
    traces = [block.sum().item() for block in H.diagonal().split(sizes)]
    assert curv.hess_trace(diag) == pytest.approx(traces, abs=1e-12)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hvp = curv.hessian_vector_product(model, loss_fn, x, y, v, reg, WEIGHT_DECAY)
    assert torch.allclose(hvp, H @ v, atol=1e-12)
    # the regularizer adds exactly weight_decay on the decayed parameters' diagonal
    plain = curv.hessian_diagonal(model, loss_fn, x, y)
    for p, d_reg, d_plain in zip(ref.trainable(model), diag, plain):
        added = WEIGHT_DECAY if any(p is w for w in reg) else 0.0
        assert torch.allclose(d_reg - d_plain, torch.full_like(p, added), atol=1e-12)


@pytest.mark.parametrize("kind, loss", CASES)
def test_power_iteration_matches_eigvalsh(kind, loss):
    model, (x, y, loss_fn, _) = setup(kind, loss, seed=2)
    H = curv.hessian(model, loss_fn, x, y)
    matvec = lambda v: curv.hessian_vector_product(model, loss_fn, x, y, v)  # noqa: E731
    eig = curv.max_abs_eigenvalue(H)
    assert abs(eig) == pytest.approx(torch.linalg.eigvalsh(H).abs().max().item())
    assert curv.power_iteration(matvec, H.shape[0]) == pytest.approx(eig, rel=1e-8)


def test_max_abs_eigenvalue_keeps_the_sign():
    assert curv.max_abs_eigenvalue(torch.diag(torch.tensor([1.0, -3.0, 2.0], dtype=torch.float64))) == -3.0


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_ggn_equals_hessian_for_a_linear_model(loss):
    model = linear_model()
    x, y, loss_fn, _ = ref.batch("mlp", loss, 6, 3)
    H = curv.hessian(model, loss_fn, x, y)
    assert torch.allclose(curv.ggn(model, loss_fn, x, y), H, atol=1e-12)
    reg = ref.weights(model)
    ggn_diag = curv.ggn_diagonal(model, loss_fn, x, y, reg, WEIGHT_DECAY)
    h_diag = curv.hessian_diagonal(model, loss_fn, x, y, reg, WEIGHT_DECAY)
    for a, b in zip(ggn_diag, h_diag):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("kind, loss", CASES)
def test_ggn_is_symmetric_psd_and_diagonal_consistent(kind, loss):
    model, (x, y, loss_fn, _) = setup(kind, loss, seed=3)
    G = curv.ggn(model, loss_fn, x, y)
    assert torch.allclose(G, G.T, atol=1e-12)
    assert torch.linalg.eigvalsh(G).min() > -1e-10
    diag = curv.ggn_diagonal(model, loss_fn, x, y)
    assert torch.allclose(torch.cat([d.reshape(-1) for d in diag]), G.diagonal())


def test_tic_formulas_on_a_hand_example():
    grads = [torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)]  # N=2, D=2
    h = [torch.tensor([1.0, 4.0], dtype=torch.float64)]
    # second moments: [(1 + 9) / 2, (4 + 0) / 2] = [5, 2]
    assert curv.tic_diag(grads, h, epsilon=0.0) == pytest.approx(5 / 1 + 2 / 4)
    assert curv.tic_trace(grads, h, epsilon=0.0) == pytest.approx(7 / 5)
    assert curv.tic_diag(grads, h) == pytest.approx(5 / (1 + 1e-7) + 2 / (4 + 1e-7))


# --- alpha -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5])
def test_alpha_fit_recovers_a_known_parabola(t):
    a, b, c = 1.5, -2.0, 0.8  # q(x) = a + b x + c x^2, minimum at x = 1.25
    fs, dfs = [a, a + b * t + c * t * t], [b, b + 2 * c * t]
    rng = np.random.default_rng(0)
    for _ in range(5):
        var_fs, var_dfs = list(10 ** rng.uniform(-3, 1, 2)), list(10 ** rng.uniform(-3, 1, 2))
        alpha = curv.alpha_from_observations(t, fs, dfs, var_fs, var_dfs)
        assert alpha == pytest.approx(t / 1.25 - 1, abs=1e-9)
    alpha = curv.alpha_from_observations(t, fs, dfs, [0.0, 0.0], [0.0, 0.0])  # all weights 1e10
    assert alpha == pytest.approx(t / 1.25 - 1, abs=1e-6)


def test_alpha_special_cases_and_weighting():
    assert curv.alpha_from_observations(1.0, [0.0, -1.0], [-1.0, -1.5], [1, 1], [1, 1]) == -1.0  # concave
    assert curv.alpha_from_observations(0.0, [1.0, 1.0], [-1.0, -1.0], [1, 1], [1, 1]) == -1.0
    # equal weights: the fit is the ordinary least-squares solution
    t, fs, dfs = 1.0, [1.0, 0.5], [-1.2, 0.9]
    design = np.array([[1, 0, 0], [1, t, t * t], [0, 1, 0], [0, 1, 2 * t]], dtype=float)
    mu = np.linalg.lstsq(design, np.array(fs + dfs), rcond=None)[0]
    expected = 2 * t / (-mu[1] / mu[2]) - 1
    assert curv.alpha_from_observations(t, fs, dfs, [2.0, 2.0], [2.0, 2.0]) == pytest.approx(expected)


@pytest.mark.parametrize("decay", [0.0, WEIGHT_DECAY])
def test_reference_alpha_on_an_exact_quadratic(decay):
    """Linear model + MSE on one batch: the loss is quadratic along any line, so alpha is exact."""
    model = linear_model(1)
    data = ref.batch("mlp", "mse", 8, 4)
    reg = ref.weights(model)
    theta_start = [p.detach().clone() for p in ref.trainable(model)]
    before = flat_params(model)
    grad = ref.batch_gradient(model, data.loss_fn, data.inputs, data.targets, reg, decay)
    H = curv.hessian(model, data.loss_fn, data.inputs, data.targets, reg, decay)
    g = torch.cat([gr.reshape(-1) for gr in grad])
    lr_min = (g.dot(g) / (g @ H @ g)).item()  # the exact line minimum along -g is at lr_min * g
    for lr_factor in (0.5, 1.0, 1.7):
        lr = lr_factor * lr_min
        theta_end = [p - lr * gr for p, gr in zip(theta_start, grad)]
        alpha = curv.reference_alpha(
            model, data.per_sample_loss_fn, data, data, theta_start, theta_end, reg, decay
        )
        assert alpha == pytest.approx(lr_factor - 1, abs=1e-7)
    assert torch.equal(flat_params(model), before)  # parameters restored


def test_alpha_observations_use_both_batches():
    model, data = setup("mlp", "ce")
    other = ref.batch("mlp", "ce", 6, 7)
    theta_start = [p.detach().clone() for p in ref.trainable(model)]
    theta_end = [p + 0.1 for p in theta_start]
    obs = curv.alpha_observations(model, data.per_sample_loss_fn, data, other, theta_start, theta_end)
    assert obs["t"] == pytest.approx(0.1 * np.sqrt(flat_params(model).numel()))
    assert obs["fs"][0] == pytest.approx(data.loss_fn(model(data.inputs), data.targets).item())
    with torch.no_grad():
        for p, v in zip(ref.trainable(model), theta_end):
            p.copy_(v)
    assert obs["fs"][1] == pytest.approx(other.loss_fn(model(other.inputs), other.targets).item())
    end_losses = other.per_sample_loss_fn(model(other.inputs), other.targets)
    assert obs["var_fs"][1] == pytest.approx(end_losses.var().item())


# --- histograms ------------------------------------------------------------------------------------


def manual_bins(values: torch.Tensor, bins: int, lo: float, hi: float) -> torch.Tensor:
    index = ((values.clamp(lo, hi) - lo) / ((hi - lo) / bins)).floor().long().clamp(0, bins - 1)
    return torch.bincount(index, minlength=bins)


@pytest.mark.parametrize("kind, loss", CASES)
def test_histograms_count_every_entry(kind, loss):
    model, (x, y, _, per_sample) = setup(kind, loss, n=6)
    grads = [10 * g for g in ref.per_sample_gradients(model, per_sample, x, y)]  # some beyond the range
    theta = ref.trainable(model)
    n_entries = ref.flatten(grads).numel()
    hist1d = ref.grad_hist1d(grads)
    assert hist1d.shape == (100,) and hist1d.dtype == torch.int64
    assert hist1d.sum().item() == n_entries
    assert torch.equal(hist1d, manual_bins(ref.flatten(grads).reshape(-1), 100, -2.0, 2.0))
    per_param = ref.grad_hist2d_per_param(grads, theta)
    hist2d = ref.grad_hist2d(grads, theta)
    assert hist2d.shape == (40, 50) and hist2d.dtype == torch.int64
    assert hist2d.sum().item() == n_entries
    assert torch.equal(hist2d, sum(per_param))
    # marginal over the parameter axis = 1-D histogram of the gradients with the same bins
    assert torch.equal(hist2d.sum(1), ref.grad_hist1d(grads, bins=40, range=(-1.0, 1.0)))
    values = torch.cat([p.detach().reshape(1, -1).expand(6, -1).reshape(-1) for p in theta])
    assert torch.equal(hist2d.sum(0), manual_bins(values, 50, -2.0, 2.0))


def test_histogram_edges_and_clamping():
    values = torch.tensor([[-5.0, -2.0, -1.99, 0.0, 1.99, 2.0, 7.0]], dtype=torch.float64)
    hist = ref.grad_hist1d(values, bins=4, range=(-2.0, 2.0))
    assert hist.tolist() == [3, 0, 1, 3]  # [-2, -1): -5, -2, -1.99; [0, 1): 0; [1, 2]: 1.99, 2, 7
    grads = [torch.tensor([[-3.0, 1.0], [0.5, 0.2]], dtype=torch.float64)]
    theta = [torch.tensor([5.0, -0.1], dtype=torch.float64)]
    hist2d = ref.grad_hist2d(grads, theta, bins=(2, 2), range=((-1.0, 1.0), (-2.0, 2.0)))
    # (g, theta) pairs: (-3, 5) -> (0, 1); (1, -0.1) -> (1, 0); (0.5, 5) -> (1, 1); (0.2, -0.1) -> (1, 0)
    assert hist2d.tolist() == [[0, 1], [2, 1]]


# --- per-layer extras ------------------------------------------------------------------------------


def test_parameter_norms_distances_and_ratios():
    theta_0 = [torch.tensor([3.0, 4.0]), torch.tensor([1.0])]
    theta_1 = [torch.tensor([3.0, 5.0]), torch.tensor([-1.0])]
    assert ref.param_norms(theta_0) == [5.0, 1.0]
    assert ref.distance(theta_1, theta_0) == [1.0, 2.0]
    assert ref.update_size(theta_1, theta_0) == [1.0, 2.0]
    assert ref.update_ratio(theta_1, theta_0) == [0.2, 2.0]
    grads = [torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([[1.0], [0.0]])]
    assert ref.grad_norm(grads) == [0.0, 0.5]
    assert ref.zero_grad_fraction(grads) == [1.0, 0.0]


def test_dead_relu_units_give_exact_zero_gradients_and_activations():
    model, (x, y, _, per_sample) = setup("mlp", "ce")
    with torch.no_grad():
        model[0].bias[:2] = -100.0  # two of five hidden units never fire
    grads = ref.per_sample_gradients(model, per_sample, x, y)
    out = model[1](model[0](x)).detach()
    never_fire = (out == 0).all(dim=0).double().mean().item()  # first-layer weight rows that get no gradient
    assert never_fire >= 2 / 5
    assert ref.zero_grad_fraction(grads)[0] == pytest.approx(never_fire)
    assert (grads[0].mean(0)[:2] == 0).all()
    stats = ref.activation_stats(model, model[1], x)
    assert stats["zero_fraction"] == pytest.approx((out == 0).double().mean().item())
    assert stats["mean"] == pytest.approx(out.mean().item())
    assert stats["std"] == pytest.approx(np.std(out.numpy()))  # population std


def test_input_stats():
    x = torch.tensor([[0.0, 1.0], [2.0, 5.0]], dtype=torch.float64)
    assert ref.input_stats(x) == pytest.approx({"mean": 2.0, "std": np.std([0, 1, 2, 5]), "min": 0.0, "max": 5.0})
