"""The byte-level transformer: shapes, size, causality, initial loss, KV cache equivalence, config checks."""
import math

import pytest
import torch

from bytelm.config import ModelConfig
from bytelm.errors import BytelmError
from bytelm.model import MLP, ByteLM, ReLUSquaredMLP

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=64)


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(**TINY))
    idx = torch.randint(0, 256, (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, 256) and loss is None
    logits, loss = model(idx, targets=idx)
    assert loss.ndim == 0 and torch.isfinite(loss)
    logits, _ = model(idx, last_only=True)
    assert logits.shape == (3, 1, 256)


def test_default_config_has_about_2_5m_parameters():
    n = ByteLM(ModelConfig()).num_params()
    assert abs(n - 2.5e6) <= 0.1 * 2.5e6, n
    cfg = ModelConfig()
    assert (cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.block_size) == (256, 6, 8, 512)


def test_changing_a_byte_never_changes_earlier_logits():
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(**TINY)).eval()
    idx = torch.randint(0, 256, (1, 40))
    for t in (0, 13, 39):
        changed = idx.clone()
        changed[0, t] = (changed[0, t] + 1) % 256
        a, _ = model(idx)
        b, _ = model(changed)
        torch.testing.assert_close(a[:, :t], b[:, :t])
        assert not torch.allclose(a[:, t:], b[:, t:])


def test_untrained_loss_is_near_uniform():
    torch.manual_seed(0)
    model = ByteLM(ModelConfig())
    idx = torch.randint(0, 256, (2, 256))
    targets = torch.randint(0, 256, (2, 256))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(256)) < 0.15, loss.item()


@pytest.mark.parametrize("value_embeds", [False, True], ids=["plain", "value-embeds"])
def test_kv_cache_prefill_chunks_and_steps_match_full_recompute(value_embeds):
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(**TINY, value_embeds=value_embeds)).eval()
    idx = torch.randint(0, 256, (2, 50))
    full, _ = model(idx)
    cache = model.new_cache(batch_size=2)
    parts = [model(idx[:, :20], cache=cache)[0],   # prefill
             model(idx[:, 20:35], cache=cache)[0],  # a chunk after cached positions
             *[model(idx[:, t:t + 1], cache=cache)[0] for t in range(35, 50)]]  # one byte at a time
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)
    assert cache.pos == 50


def test_sequence_longer_than_context_is_refused():
    model = ByteLM(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("bad", [dict(n_layer=-1), dict(vocab_size=50257), dict(block_size=10**9),
                                 dict(n_embd=30, n_head=4), dict(n_layer="6"), dict(n_embd=10**6)])
def test_absurd_configs_are_refused_with_a_clear_error(bad):
    with pytest.raises(BytelmError, match="invalid model config"):
        ModelConfig(**bad)


def test_config_round_trips_through_a_plain_dict():
    cfg = ModelConfig(**TINY)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(BytelmError, match="unknown fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "evil": 1})


def test_relu_squared_mlp_backward_is_exact():
    """The memory-saving MLP's hand-written backward against numerical derivatives (float64)."""
    torch.manual_seed(0)
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    w_fc = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    w_proj = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ReLUSquaredMLP.apply, (x, w_fc, w_proj))


def test_training_mlp_matches_the_reference_and_saves_less():
    """In training the MLP keeps its input and fc(x) only, not relu(h) and relu(h)^2; same loss, same grads."""
    torch.manual_seed(0)
    mlp = MLP(ModelConfig(**TINY))
    x = torch.randn(3, 10, 32, requires_grad=True)
    saved = []

    def count(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        out = mlp(x)
    fast_grads = torch.autograd.grad(out.square().sum(), [x, *mlp.parameters()])
    ref = mlp.proj(torch.relu(mlp.fc(x)).square())
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *mlp.parameters()])
    torch.testing.assert_close(out, ref)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b)
    hidden = 3 * 10 * 4 * 32
    assert sum(n for n in saved if n == hidden) == hidden  # one (N, 4C) activation kept, not two or three


def test_value_embeddings_feed_each_layer_the_byte_itself():
    """With value embeddings on, each layer's values get its own row of the byte's table: changing one layer's
    rows changes the output, and a model without them has no such table (older checkpoints load unchanged)."""
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(**TINY, value_embeds=True)).eval()
    L, C = model.config.n_layer, model.config.n_embd
    assert model.value_embed.weight.shape == (256, L * C)
    idx = torch.randint(0, 256, (1, 20))
    before, _ = model(idx)
    with torch.no_grad():
        model.value_embed.weight[:, C:2 * C] += 1.0  # layer 1's rows only
    after, _ = model(idx)
    assert (after - before).abs().max() > 1e-3
    assert ByteLM(ModelConfig(**TINY)).value_embed is None
    assert ModelConfig.from_dict({k: v for k, v in ModelConfig(**TINY).to_dict().items()
                                  if k != "value_embeds"}).value_embeds is False  # a checkpoint from before
