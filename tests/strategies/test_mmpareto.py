"""MMPareto: hand-computed Pareto weights and integrated gradients, and the step applying them."""

from __future__ import annotations

import copy

import pytest
import torch

from miles.models.losses import head_losses
from miles.strategies import build_strategy
from miles.strategies.mmpareto import MMPareto, cosine, integrate, pareto_weights
from tests.strategies.stepping import random_batch, small_model, step_context

T = torch.tensor


def test_conflicting_gradients_by_hand() -> None:
    """g_mm = (1, 0), g_u = (-0.5, 0.5): cos = -0.707107; alpha_mm = (g_u - g_mm)^T g_u /
    ||g_mm - g_u||^2 = 1 / 2.5 = 0.4; h = 2 (0.4 g_mm + 0.6 g_u) = (0.2, 0.6), ||h|| = 0.632456 <
    ||g_mm + g_u|| = 0.707107, so h is scaled by 1.118034, then by gamma = 1.5:
    (0.335410, 1.006231)."""
    g_m, g_u = [T([1.0, 0.0])], [T([-0.5, 0.5])]
    assert cosine(g_m, g_u) == pytest.approx(-0.707107, abs=1e-6)
    weights = pareto_weights(g_m, g_u)
    assert weights == (pytest.approx(0.4), pytest.approx(0.6))
    got = integrate(g_m[0] + g_u[0], g_m[0], g_u[0], weights, 1.5)
    torch.testing.assert_close(got, T([0.335410, 1.006231]), atol=1e-6, rtol=0)


def test_aligned_gradients_by_hand() -> None:
    """g_u = (0.5, 0.5): no conflict, equal weights, h = g_mm + g_u; gamma 1.5: (2.25, 0.75)."""
    g_m, g_u = [T([1.0, 0.0])], [T([0.5, 0.5])]
    assert cosine(g_m, g_u) > 0
    got = integrate(g_m[0] + g_u[0], g_m[0], g_u[0], (0.5, 0.5), 1.5)
    torch.testing.assert_close(got, T([2.25, 0.75]))


def test_solver_edges_and_dot_products_over_tensors() -> None:
    """Past the segment's ends the authors' solver clamps to 0.999 / 0.001; dot products sum over
    every tensor of the encoder."""
    assert pareto_weights([T([1.0, 0.0])], [T([2.0, 0.0])])[0] == 0.999  # <g_m, g_u> >= |g_m|^2
    assert pareto_weights([T([2.0, 0.0])], [T([1.0, 0.0])])[0] == 0.001  # <g_m, g_u> >= |g_u|^2
    split = pareto_weights([T([1.0]), T([0.0])], [T([-0.5]), T([0.5])])
    assert split == pytest.approx((0.4, 0.6))
    assert cosine([T([1.0]), None], [T([1.0]), T([3.0])]) == pytest.approx(1.0 / 10**0.5)
    # a zero combination keeps zero (the authors would divide by zero)
    torch.testing.assert_close(integrate(T([1.0]), T([0.0]), T([0.0]), (0.3, 0.7), 1.5), T([0.0]))


def test_the_step_replaces_each_encoders_gradient_and_leaves_the_heads() -> None:
    model = small_model(("a", "b"), seed=3)
    reference = copy.deepcopy(model)
    batch = random_batch(("a", "b"), n=8, seed=4)
    strategy = MMPareto(gamma=1.5)
    strategy.configure_model(model)
    ctx = step_context(model, lr=0.0)  # lr 0 keeps the gradients readable
    strategy.training_step(ctx, batch)
    # the same gradients, computed independently on a copy
    out = reference(batch["inputs"])
    losses = head_losses(out, batch["target"])
    for m in ("a", "b"):
        params = list(reference.encoders[m].parameters())
        g_m = torch.autograd.grad(losses["fused"], params, retain_graph=True)
        g_u = torch.autograd.grad(losses[m], params, retain_graph=True)
        weights = pareto_weights(g_m, g_u) if cosine(g_m, g_u) <= 0 else (0.5, 0.5)
        for p, a, b in zip(model.encoders[m].parameters(), g_m, g_u, strict=True):
            assert p.grad is not None
            torch.testing.assert_close(p.grad, integrate(a + b, a, b, weights, 1.5))
    sum(losses.values()).backward()  # type: ignore[union-attr]
    for name in ("heads.a.weight", "fusion.head.weight"):
        got = dict(model.named_parameters())[name].grad
        want = dict(reference.named_parameters())[name].grad
        torch.testing.assert_close(got, want)  # heads keep the total gradient, no gamma
    record = strategy.on_epoch_end(ctx, 1, None, None)  # type: ignore[arg-type]
    assert record["conflict_fraction"] == {"a": 0.0, "b": 1.0}  # both branches ran


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="gamma"):
        build_strategy("mmpareto", gamma=0.0)
    with pytest.raises(TypeError, match="resolve_conflicts"):
        build_strategy("mmpareto", resolve_conflicts=1)
