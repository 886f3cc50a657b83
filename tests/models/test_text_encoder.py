"""BertTextEncoder: (B, 2, L) ids+mask in, pooled latents out; masking, gradients, local loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from miles.models.text import BertTextEncoder

TINY = {
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


def _batch(lengths: list[int], total: int, seed: int = 0) -> torch.Tensor:
    """(B, 2, total): random ids 5..99 for the real tokens, [CLS]=2 first, padding id 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(lengths), 2, total, dtype=torch.int64)
    for i, n in enumerate(lengths):
        x[i, 0, :n] = torch.randint(5, 100, (n,), generator=g)
        x[i, 0, 0] = 2
        x[i, 1, :n] = 1
    return x


def _encoder(**kwargs: object) -> BertTextEncoder:
    torch.manual_seed(0)
    return BertTextEncoder(config=TINY, **kwargs).eval()  # type: ignore[arg-type]


def test_shapes_and_projection() -> None:
    x = _batch([5, 9, 3], 12)
    enc = _encoder()
    assert enc.out_features == 32 and enc(x).shape == (3, 32)
    proj = _encoder(out_features=16)
    assert proj.out_features == 16 and proj(x).shape == (3, 16)
    assert _encoder(pooling="pooler")(x).shape == (3, 32)
    assert _encoder(pooling="mean", out_features=32).proj.__class__.__name__ == "Identity"


@pytest.mark.parametrize("pooling", ["cls", "mean", "pooler"])
def test_padding_and_its_content_do_not_change_the_output(pooling: str) -> None:
    enc = _encoder(pooling=pooling, trim_padding=False)
    short = _batch([5, 7], 8)
    long = torch.zeros(2, 2, 20, dtype=torch.int64)
    long[:, :, :8] = short
    long[:, 0, 8:] = torch.randint(5, 100, (2, 12))  # garbage under mask 0
    with torch.no_grad():
        a, b = enc(short), enc(long)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # trimming the padding (the default) gives the same as running over all of it
    trimmed = _encoder(pooling=pooling)
    with torch.no_grad():
        torch.testing.assert_close(trimmed(long), b, atol=1e-5, rtol=1e-5)
    # ...and the mask does matter: unmasking the garbage changes the result
    unmasked = long.clone()
    unmasked[:, 1, :] = 1
    with torch.no_grad():
        assert not torch.allclose(enc(unmasked), b, atol=1e-4)


def test_gradients_reach_bert_and_freeze_stops_them() -> None:
    x = _batch([6, 4], 10)
    enc = _encoder(out_features=8).train()
    enc(x).pow(2).sum().backward()
    grads = {n: p.grad for n, p in enc.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert float(grads["bert.embeddings.word_embeddings.weight"].abs().sum()) > 0
    assert not any("pooler" in n for n in grads)  # dropped for cls pooling

    frozen = _encoder(out_features=8, freeze=True).train()
    assert not frozen.bert.training  # a frozen BERT never uses dropout
    frozen(x).sum().backward()
    assert all(p.grad is None for p in frozen.bert.parameters())
    assert frozen.proj.weight.grad is not None


def test_loads_a_local_checkpoint_only(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    BertModel(BertConfig(**TINY)).save_pretrained(tmp_path / "bert")
    enc = BertTextEncoder(tmp_path / "bert").eval()
    ref = BertModel.from_pretrained(tmp_path / "bert", local_files_only=True).eval()
    x = _batch([5, 8], 8)
    with torch.no_grad():
        expected = ref(input_ids=x[:, 0], attention_mask=x[:, 1]).last_hidden_state[:, 0]
        torch.testing.assert_close(enc(x), expected)
    assert enc.source == str(tmp_path / "bert")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        BertTextEncoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        BertTextEncoder(tmp_path / "empty")


def test_bad_arguments_and_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        BertTextEncoder()
    with pytest.raises(ValueError, match="exactly one"):
        BertTextEncoder("x", config=TINY)
    with pytest.raises(ValueError, match="pooling"):
        BertTextEncoder(config=TINY, pooling="max")
    with pytest.raises(ValueError, match="out_features"):
        BertTextEncoder(config=TINY, out_features=0)
    enc = _encoder()
    with pytest.raises(ValueError, match=r"\(B, 2, L\)"):
        enc(torch.zeros(2, 10, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer"):
        enc(torch.zeros(2, 2, 10))
    bad = _batch([4], 6)
    bad[0, 0, 1] = 100
    with pytest.raises(ValueError, match="vocabulary"):
        enc(bad)
    with pytest.raises(ValueError, match="positions"):
        _encoder(trim_padding=False)(_batch([3], 70))
