"""Optimizer groups (Muon for hidden matrices, AdamW for the rest), the fp32 Muon path, and the LR schedule."""
import pytest
import torch

import bytelm.train.optim as optim_mod
from bytelm.config import ModelConfig
from bytelm.model import ByteLM
from bytelm.train.optim import Muon, build_optimizers, newton_schulz, normalize_neurons, split_params
from bytelm.train.schedule import lr_scale, muon_momentum

TINY = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)
HIDDEN = {"attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight"}


@pytest.mark.parametrize("config", [TINY, ModelConfig(), ModelConfig(n_layer=3, n_head=2, n_embd=32,
                                                                       tie_embeddings=False),
                                    ModelConfig(n_layer=3, n_head=2, n_embd=32, value_embeds=True)],
                         ids=["tiny", "default", "untied", "value-embeds"])
def test_muon_gets_exactly_the_hidden_matrices_and_every_parameter_one_group(config):
    with torch.device("meta"):
        model = ByteLM(config)
    muon, adamw = split_params(model)
    expected = {f"blocks.{i}.{n}" for i in range(config.n_layer) for n in HIDDEN}
    assert {n for n, _ in muon} == expected
    assert all(p.ndim == 2 for _, p in muon)
    adam_names = {n for n, _ in adamw}
    assert "embed.weight" in adam_names and "norm_f.weight" in adam_names
    assert ("head.weight" in adam_names) == (not config.tie_embeddings)  # tied head is embed.weight
    assert ("value_embed.weight" in adam_names) == config.value_embeds  # a lookup table, not a hidden matrix
    ids = [id(p) for _, p in muon + adamw]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_build_optimizers_groups_cover_the_model_once():
    model = ByteLM(TINY)
    muon, adamw = build_optimizers(model, muon_lr=0.01, adam_lr=0.001)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adam = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert not in_muon & in_adam
    assert in_muon | in_adam == {id(p) for p in model.parameters()}
    assert id(model.embed.weight) in in_adam and id(model.head.weight) in in_adam
    assert muon.param_groups[0]["lr"] == 0.01 and adamw.param_groups[0]["lr"] == 0.001


def test_an_unknown_2d_parameter_goes_to_adamw_not_muon():
    model = ByteLM(TINY)
    model.extra = torch.nn.Parameter(torch.zeros(3, 3))  # 2-D, but not a hidden matrix by role
    muon, adamw = split_params(model)
    assert "extra" in {n for n, _ in adamw} and "extra" not in {n for n, _ in muon}


def test_renamed_hidden_matrices_fail_loudly_instead_of_all_going_to_adamw(monkeypatch):
    import re
    monkeypatch.setattr(optim_mod, "_MUON_NAME", re.compile(r"^nothing$"))
    with pytest.raises(AssertionError, match="no hidden matrices"):
        split_params(ByteLM(TINY))


def test_newton_schulz_in_bf16_is_bit_identical_to_torch():
    torch_ns = pytest.importorskip("torch.optim._muon")._zeropower_via_newtonschulz
    g = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    ours = newton_schulz(g, dtype=torch.bfloat16)
    theirs = torch_ns(g, optim_mod.NS_COEFFICIENTS, optim_mod.NS_STEPS, 1e-7)
    assert torch.equal(ours, theirs)


def test_newton_schulz_in_fp32_orthogonalises():
    g = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    s = torch.linalg.svdvals(newton_schulz(g, dtype=torch.float32))
    assert s.min() > 0.5 and s.max() < 1.5  # Keller Jordan's iteration lands S' in about (0.5, 1.5)


@pytest.mark.parametrize("shape", [(96, 24), (24, 96), (3, 40, 24), (2, 16, 64)])
def test_gram_iteration_agrees_with_the_direct_one(shape):
    """The fp32 step iterates on the Gram matrix of wide (or tall) matrices; it must land where the textbook
    iteration does, also for a gradient-like spectrum (a few large directions and many small ones)."""
    gen = torch.Generator().manual_seed(5)
    rows, cols = shape[-2:]
    g = torch.randn(*shape[:-2], rows, 4, generator=gen) @ torch.randn(*shape[:-2], 4, cols, generator=gen)
    g += 0.05 * torch.randn(*shape, generator=gen)
    exact = newton_schulz(g.double(), dtype=torch.float64, gram=False)
    got = newton_schulz(g, dtype=torch.float32, gram=True)
    assert (got.double() - exact).abs().max() < 1e-3 * exact.abs().max()
    torch.testing.assert_close(newton_schulz(g, dtype=torch.float32), got, rtol=0, atol=0)  # auto picks it
    # where it is no cheaper (square) the direct iteration runs; in bf16 it always does (the test above)
    sq = g[..., :min(rows, cols), :min(rows, cols)].contiguous()
    torch.testing.assert_close(newton_schulz(sq), newton_schulz(sq, gram=False), rtol=0, atol=0)


def test_fp32_muon_step_is_torchs_update_with_fp32_orthogonalisation(monkeypatch):
    """Same momentum, Nesterov, weight decay and per-shape lr as torch.optim.Muon; only the NS dtype differs."""
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(24, 8, generator=gen), torch.randn(8, 8, generator=gen)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(3)]

    def run(opt_cls, **kw):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = opt_cls(params, lr=0.02, weight_decay=0.1, momentum=0.9, **kw)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        return params

    ours = run(Muon, ns_dtype=torch.float32)
    monkeypatch.setattr("torch.optim._muon._zeropower_via_newtonschulz",
                        lambda g, coeffs, steps, eps: newton_schulz(g, coeffs, steps, eps, torch.float32))
    reference = run(torch.optim.Muon)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_newton_schulz_runs_in_fp32_on_a_cpu_without_fast_bf16(monkeypatch):
    monkeypatch.setattr(optim_mod, "cpu_has_fast_bf16", lambda: False)
    muon, _ = build_optimizers(ByteLM(TINY), muon_lr=0.01, adam_lr=0.001)
    assert muon.ns_dtype == torch.float32
    monkeypatch.setattr(optim_mod, "cpu_has_fast_bf16", lambda: True)
    muon, _ = build_optimizers(ByteLM(TINY), muon_lr=0.01, adam_lr=0.001)
    assert muon.ns_dtype == torch.bfloat16


def _assert_same_state(a, b, where="state"):
    """Equal nested optimizer state: tensors equal in value, dtype and shape; everything else ==."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_optimizer_state_survives_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ByteLM(TINY)
    opts = build_optimizers(model, muon_lr=0.01, adam_lr=0.001)
    x = torch.randint(0, 256, (2, 16))
    model(x, x)[1].backward()
    for o in opts:
        o.step()
    saved = [o.state_dict() for o in opts]
    assert all(s["state"] for s in saved)  # momentum buffers and moments exist: there is something to lose
    torch.save(saved, tmp_path / "o.pt")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    states = torch.load(tmp_path / "o.pt", weights_only=True)
    clone = ByteLM(TINY)
    clone.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    restored = build_optimizers(clone, muon_lr=0.01, adam_lr=0.001)
    for o, s in zip(restored, states):
        o.load_state_dict(s)
    _assert_same_state([o.state_dict() for o in restored], saved)
    # And the restored pair takes the same next step, to the bit, as the original.
    for m, optimizers in ((model, opts), (clone, restored)):
        for o in optimizers:
            o.zero_grad()
        m(x, x)[1].backward()
        for o in optimizers:
            o.step()
    for (name, a), b in zip(model.state_dict().items(), clone.state_dict().values()):
        assert torch.equal(a, b), name


def test_lr_schedule_warms_up_holds_then_decays_to_zero():
    total, warmup = 100, 10
    scales = [lr_scale(s, total, warmup, 0.4) for s in range(total)]
    assert scales[0] == pytest.approx(0.1) and scales[9] == 1.0
    assert all(s == 1.0 for s in scales[10:60])
    assert all(a > b for a, b in zip(scales[60:], scales[61:]))  # strictly decreasing cooldown
    assert 0 < scales[-1] <= 1 / 40
    assert lr_scale(total, total, warmup, 0.4) == 0.0
    assert [lr_scale(s, total, warmup, 0.4) for s in range(total)] == scales  # pure: same inputs, same curve


def test_lr_schedule_without_warmup_or_cooldown_is_flat():
    assert {lr_scale(s, 50, 0, 0.0) for s in range(50)} == {1.0}


def test_muon_momentum_rises_from_0_85_to_0_95_over_its_warmup_then_holds():
    curve = [muon_momentum(s, 300) for s in range(400)]
    assert curve[0] == pytest.approx(0.85) and curve[150] == pytest.approx(0.90)
    assert all(a < b for a, b in zip(curve[:300], curve[1:301]))  # rises every step of the warmup
    assert curve[300:] == pytest.approx([0.95] * 100)
    assert {muon_momentum(s, 0) for s in range(10)} == {0.95}  # warmup off: torch's default throughout


def test_newton_schulz_of_a_stack_orthogonalises_each_matrix_alone():
    """Muon's fp32 step orthogonalises same-shape matrices as one stack: the same as one at a time."""
    gen = torch.Generator().manual_seed(3)
    for shape in ((3, 40, 12), (4, 12, 40)):  # tall and wide
        stack = torch.randn(*shape, generator=gen)
        stack[1] *= 100  # each matrix is normalised by its own norm, not the stack's
        together = newton_schulz(stack, dtype=torch.float32)
        for i in range(shape[0]):
            torch.testing.assert_close(together[i], newton_schulz(stack[i], dtype=torch.float32),
                                       rtol=1e-5, atol=1e-5)


def test_fp32_muon_step_with_same_shape_matrices_matches_one_at_a_time():
    gen = torch.Generator().manual_seed(4)
    weights = [torch.randn(24, 8, generator=gen) for _ in range(3)] + [torch.randn(8, 8, generator=gen)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(3)]

    def run():
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = Muon(params, lr=0.02, weight_decay=0.1, momentum=0.9, ns_dtype=torch.float32)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        return params

    batched = run()  # the three 24x8 matrices go through newton_schulz as one stack
    one_at_a_time = []
    for w, gs in zip(weights, zip(*grads)):  # each matrix alone in its own optimizer: no stacking possible
        p = torch.nn.Parameter(w.clone())
        opt = Muon([p], lr=0.02, weight_decay=0.1, momentum=0.9, ns_dtype=torch.float32)
        for g in gs:
            p.grad = g.clone()
            opt.step()
        one_at_a_time.append(p)
    for a, b in zip(batched, one_at_a_time):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)], ids=["tall", "wide"])
def test_normuon_evens_out_the_neurons_and_keeps_the_update_norm(shape):
    """Each neuron (a row of a tall matrix, a column of a wide one) ends with the same RMS step."""
    gen = torch.Generator().manual_seed(3)
    rows, cols = shape
    axis = -1 if rows >= cols else -2
    neurons = max(rows, cols)
    # An update whose neurons' sizes differ 10x, and which changes a little from step to step.
    sizes = torch.linspace(0.1, 1.0, neurons).view(-1, 1) if axis == -1 else torch.linspace(0.1, 1.0, neurons)
    second_moment = torch.zeros((rows, 1) if axis == -1 else (1, cols))
    mean_sq_in, mean_sq_out = torch.zeros(neurons), torch.zeros(neurons)  # per neuron, over the last 200 steps
    for step in range(400):
        update = torch.randn(shape, generator=gen) * sizes
        out = normalize_neurons(update, second_moment)
        assert out.norm() == pytest.approx(update.norm().item(), rel=1e-5)
        if step >= 200:
            mean_sq_in += update.square().mean(axis)
            mean_sq_out += out.square().mean(axis)
    assert mean_sq_in.max() / mean_sq_in.min() > 50
    assert mean_sq_out.max() / mean_sq_out.min() < 1.3, mean_sq_out


def test_normuon_step_is_muons_orthogonalised_update_normalised_per_neuron():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(24, 8, generator=gen)
    grads = [torch.randn_like(w) for _ in range(3)]
    p = torch.nn.Parameter(w.clone())
    opt = Muon([p], lr=0.02, weight_decay=0.1, momentum=0.9, ns_dtype=torch.float32, normuon=True)
    ref, buf, second_moment = w.clone(), torch.zeros_like(w), torch.zeros(24, 1)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + 0.1 * g
        ortho = newton_schulz(0.1 * g + 0.9 * buf)  # Nesterov
        second_moment = 0.95 * second_moment + 0.05 * ortho.square().mean(-1, keepdim=True)
        scaled = ortho / second_moment.sqrt()
        step = scaled * ortho.norm() / scaled.norm()
        ref = ref * (1 - 0.02 * 0.1) - 0.02 * (24 / 8) ** 0.5 * step
    torch.testing.assert_close(p.detach(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["second_moment"], second_moment, rtol=1e-5, atol=0)


def test_normuon_runs_on_the_bf16_path_too_and_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(optim_mod, "cpu_has_fast_bf16", lambda: True)  # torch's own bf16 step, unless NorMuon
    model = ByteLM(TINY)
    x = torch.randint(0, 256, (2, 16))
    for normuon in (False, True):
        muon, _ = build_optimizers(model, muon_lr=0.01, adam_lr=0.001, normuon=normuon)
        assert muon.ns_dtype == torch.bfloat16 and muon.normuon is normuon
        model.zero_grad()
        model(x, x)[1].backward()
        muon.step()
        has = ["second_moment" in muon.state[p] for g in muon.param_groups for p in g["params"]]
        assert all(has) if normuon else not any(has)
