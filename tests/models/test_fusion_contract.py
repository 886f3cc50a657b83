"""One harness every registered fusion runs: shapes, gradients, seeding, batch independence, and
either exact additive shares or a clear refusal (then MILES's ablation estimator is the way).

A fusion the library registers without an entry in ``ADDITIVE`` fails the coverage test: a new
fusion adds a line here.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import Tensor

from miles.metrics import ablated_fused_scores, make_metric
from miles.models import JointFusionModel
from miles.models.encoders import MLPEncoder
from miles.models.fusions import Fusion, available_fusions, build_fusion, fusion_class
from tests.helpers import assert_table_covers_library

#: whether each registered fusion splits its logits into one share per modality
ADDITIVE = {"concat": True, "sum": True, "gated": True, "film": False, "attention": False}
#: readouts a balancing method installs in its configure_model (not a fusion a user picks for
#: joint training: no fused head of their own, or an ensemble that starts empty); each method's
#: tests cover them (tests/models/test_per_modality_fusions.py and the strategies' tests)
METHOD_READOUTS = {"uncertainty": "mla", "boosted-sum": "reconboost", "mmtm": "greedy"}
CLASSES = 5


def test_every_registered_fusion_has_an_entry() -> None:
    modules = {n: fusion_class(n).__module__ for n in available_fusions()}
    assert not set(ADDITIVE) & set(METHOD_READOUTS)
    assert_table_covers_library("fusions", modules, {**ADDITIVE, **METHOD_READOUTS}, __file__)


def _sizes(name: str, n: int) -> dict[str, int]:
    """Unequal latent sizes where the fusion accepts them (sum needs equal ones)."""
    unequal = {m: 4 + 2 * i for i, m in enumerate("abc"[:n])}
    try:
        build_fusion(name, unequal, CLASSES)
    except ValueError:
        return dict.fromkeys("abc"[:n], 6)
    return unequal


def _latents(sizes: Mapping[str, int], batch: int = 6, seed: int = 1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, d, generator=g) for m, d in sizes.items()}


@pytest.fixture(params=sorted(ADDITIVE))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("n", [2, 3])
def test_logits_shape_and_gradient_to_every_latent(name: str, n: int) -> None:
    sizes = _sizes(name, n)
    torch.manual_seed(0)
    fusion = build_fusion(name, sizes, CLASSES)
    assert isinstance(fusion, Fusion) and fusion.name == name
    assert fusion.head.in_features == fusion.fused_features(sizes)
    latents = {m: z.requires_grad_() for m, z in _latents(sizes).items()}
    logits = fusion(latents)
    assert logits.shape == (6, CLASSES)
    logits.square().sum().backward()
    for m, z in latents.items():
        assert z.grad is not None and z.grad.abs().sum() > 0, f"{name}: no gradient reaches {m}"
    with pytest.raises(ValueError, match="latents lack"):
        fusion({m: z for m, z in latents.items() if m != "a"})


def test_seeded_construction_and_tensor_only_state(name: str) -> None:
    sizes = _sizes(name, 2)
    torch.manual_seed(3)
    first = build_fusion(name, sizes, CLASSES)
    torch.manual_seed(3)
    second = build_fusion(name, sizes, CLASSES)
    a, b = first.state_dict(), second.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert all(isinstance(v, Tensor) for v in a.values())


def test_samples_do_not_see_each_other(name: str) -> None:
    sizes = _sizes(name, 3)
    torch.manual_seed(0)
    fusion = build_fusion(name, sizes, CLASSES).eval()
    latents = _latents(sizes)
    whole = fusion(latents)
    one = fusion({m: z[2:3] for m, z in latents.items()})
    torch.testing.assert_close(whole[2:3], one)


def test_shares_add_up_or_the_fusion_says_why_not(name: str) -> None:
    sizes = _sizes(name, 3)
    torch.manual_seed(0)
    fusion = build_fusion(name, sizes, CLASSES)
    with torch.no_grad():
        fusion.head.bias.normal_()
    latents = _latents(sizes)
    if ADDITIVE[name]:
        shares = [fusion.modality_logits(latents, m) for m in sizes]
        torch.testing.assert_close(sum(shares), fusion(latents))
        with pytest.raises(ValueError, match="unknown modality"):
            fusion.modality_logits(latents, "z")
    else:
        with pytest.raises(NotImplementedError, match="not additive"):
            fusion.modality_logits(latents, "a")


def test_in_a_model_with_the_ablation_estimator(name: str) -> None:
    """Every fusion trains in the joint model and gives the ablation estimator's scores."""
    sizes = _sizes(name, 2)
    torch.manual_seed(0)
    encoders = {m: MLPEncoder(3, d, hidden=(4,)) for m, d in sizes.items()}
    model = JointFusionModel(encoders, CLASSES, fusion=name)
    x = {m: torch.randn(8, 3) for m in sizes}
    y = torch.arange(8) % CLASSES
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out.fused, y)
    loss.backward()
    assert all(p.grad is not None for p in model.fusion.parameters())
    scores = ablated_fused_scores(model, out.latents, y, make_metric("accuracy", CLASSES))
    assert set(scores) == set(sizes) and all(0.0 <= s <= 1.0 for s in scores.values())


def test_film_target_and_attention_heads() -> None:
    sizes = {"a": 4, "b": 6}
    film = build_fusion("film", sizes, CLASSES, target="b")
    assert film.head.in_features == 6 and film.film.in_features == 4
    with pytest.raises(ValueError, match="target 'c'"):
        build_fusion("film", sizes, CLASSES, target="c")
    attention = build_fusion("attention", sizes, CLASSES, heads=4)
    assert attention.head.in_features == 8  # widest latent rounded up to a multiple of heads
    with pytest.raises(ValueError, match="heads"):
        build_fusion("attention", sizes, CLASSES, heads=0)
