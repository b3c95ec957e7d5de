import pytest
import torch

from smapctl.models.flow_head import FlowHead, FlowHeadConfig, timestep_embedding


def tiny_head(**kw) -> FlowHead:
    torch.manual_seed(0)
    return FlowHead(FlowHeadConfig(**{"token_dim": 4, "cond_dim": 8, "width": 32, "depth": 2, **kw}))


def perturb(module: torch.nn.Module, std: float = 0.1) -> None:
    """Move every parameter off its (partly zero) initialisation so outputs depend on all of them."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn_like(p))


def test_starts_as_zero_velocity():
    head = tiny_head()
    x, z = torch.randn(5, 4), torch.randn(5, 8)
    assert torch.equal(head.velocity(x, torch.rand(5), z), torch.zeros(5, 4))


def test_blocks_compute_the_adaln_residual_mlp_and_its_gradients():
    # The blocks are written with functional calls (flow_head.py); they must compute what their
    # submodules compose to: x + mlp(LN(x) * (1 + scale) + shift), and LN(x) * (1 + scale) + shift -> linear.
    head = tiny_head()
    perturb(head)
    x = torch.randn(5, 32, requires_grad=True)
    c = torch.randn(5, 32)
    mods = head.modulations(c)
    for layer, (shift, gain) in zip((*head.blocks, head.final), mods, strict=True):
        shift_ref, scale_ref = layer.modulation(c).chunk(2, dim=-1)
        torch.testing.assert_close(gain, 1 + scale_ref)
        modulated = layer.norm(x) * (1 + scale_ref) + shift_ref
        ref = x + layer.mlp(modulated) if layer is not head.final else layer.linear(modulated)
        out = layer(x, shift, gain)
        torch.testing.assert_close(out, ref)
        params = [x, *layer.parameters()]
        grads = torch.autograd.grad(out.square().sum(), params, retain_graph=True)
        torch.testing.assert_close(grads, torch.autograd.grad(ref.square().sum(), params))


def test_timestep_embedding_shape_and_range():
    e = timestep_embedding(torch.tensor([0.0, 0.5, 1.0]), 16)
    assert e.shape == (3, 16)
    assert e.abs().max() <= 1.0
    assert torch.equal(e[0, :8], torch.ones(8))  # cos(0)


def test_loss_is_deterministic_given_a_generator():
    head = tiny_head()
    perturb(head)
    x, z = torch.randn(6, 4), torch.randn(6, 8)
    a = head(x, z, torch.Generator().manual_seed(3))
    b = head(x, z, torch.Generator().manual_seed(3))
    assert a.ndim == 0 and torch.equal(a, b)


def test_loss_is_the_rectified_flow_velocity_error():
    """Eq. 6 and the convention sampling relies on (t = 0 noise, t = 1 data): x_t = (1 - t) noise + t x,
    and the head regresses the velocity x - noise at x_t, with t ~ U[0, 1] and noise ~ N(0, I) drawn in
    that order from the generator. A swapped convention (noise at t = 1, or the target noise - x) would
    train a head whose samples run backwards."""
    head = tiny_head()
    perturb(head)
    x, z = torch.randn(6, 4), torch.randn(6, 8)
    g = torch.Generator().manual_seed(3)
    t, noise = torch.rand(6, generator=g), torch.randn(6, 4, generator=g)
    x_t = (1 - t[:, None]) * noise + t[:, None] * x  # (N, C)
    expected = (head.velocity(x_t, t, z) - (x - noise)).square().mean()
    torch.testing.assert_close(head(x, z, torch.Generator().manual_seed(3)), expected)


def test_learns_to_transport_noise_to_fixed_tokens():
    # Two conditions, each with one target token: the flow must carry any noise onto that token.
    head = tiny_head()
    targets = torch.tensor([[1.0, -1.0, 0.5, 2.0], [-2.0, 0.0, 1.0, -0.5]])
    conds = torch.randn(2, 8)
    opt = torch.optim.Adam(head.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / 500)
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        loss = head(targets.repeat(32, 1), conds.repeat(32, 1), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    out = head.sample(conds.repeat(4, 1), steps=25, generator=g)
    assert (out - targets.repeat(4, 1)).abs().max() < 0.15


def test_guidance_scale_one_equals_conditional_and_zero_equals_unconditional():
    head = tiny_head()
    perturb(head)
    zc, zu = torch.randn(3, 8), torch.randn(3, 8)
    both = torch.cat([zc, zu])

    def run(z, scale):
        return head.sample(z, steps=10, cfg_scale=scale, generator=torch.Generator().manual_seed(7))

    torch.testing.assert_close(run(both, 1.0), run(zc, None), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(both, 0.0), run(zu, None), atol=1e-5, rtol=1e-5)
    per_row = run(both, torch.tensor([1.0, 0.0, 0.0]))  # a scale per row (not a palindrome: row order counts)
    torch.testing.assert_close(per_row[0], run(zc, None)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_row[1:], run(zu, None)[1:], atol=1e-5, rtol=1e-5)


def test_zero_temperature_ignores_the_noise():
    head = tiny_head()
    perturb(head)
    z = torch.randn(3, 8)
    a = head.sample(z, steps=5, temperature=0.0, generator=torch.Generator().manual_seed(1))
    b = head.sample(z, steps=5, temperature=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_solvers_on_a_known_velocity_field():
    # With v = -x the ODE from t = 0 to 1 has the exact solution x(1) = x(0) / e.
    head = tiny_head().double()
    head.velocity_from_modulations = lambda x, mods: -x
    z = torch.randn(4, 8, dtype=torch.float64)
    x0 = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def error(method):
        out = head.sample(z, steps=20, method=method, generator=torch.Generator().manual_seed(5))
        return (out - x0 / torch.e).abs().max()

    assert error("heun") < 1e-3 * x0.abs().max()
    assert error("euler") > 10 * error("heun")


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("rows", [1, 12, 1000])  # 6 rows: 1, 2 or all time points per call
def test_sample_with_batched_modulations_equals_the_plain_solver(monkeypatch, method, rows):
    # `sample` computes the adaLN modulations of several time points in one call; the result must be the
    # plain solver's, whose velocity takes c = cond_proj(z) + time_embed(t) at each evaluation.
    monkeypatch.setattr("smapctl.models.flow_head._MODULATION_ROWS", rows)
    head = tiny_head()
    perturb(head)
    z, steps, scale = torch.randn(6, 8), 7, 2.5  # 3 guided rows
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(4))

    def v(x, t):
        c = head.cond_proj(z) + head.time_embed(torch.full((6,), t))
        vc, vu = head.velocity_from_cond(torch.cat([x, x]), c).chunk(2)
        return vu + scale * (vc - vu)

    with torch.no_grad():
        dt = 1 / steps
        for i in range(steps):
            t = i / steps
            v1 = v(x, t)
            x = x + dt * v1 if method == "euler" else x + 0.5 * dt * (v1 + v(x + dt * v1, t + dt))
    out = head.sample(z, steps, cfg_scale=scale, method=method, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)


def test_rejects_bad_sampling_arguments():
    head = tiny_head()
    with pytest.raises(ValueError, match="method"):
        head.sample(torch.randn(2, 8), method="rk4")
    with pytest.raises(ValueError, match="steps"):
        head.sample(torch.randn(2, 8), steps=0)


def test_timestep_embedding_reads_1000_t():
    # DiT/MAR's time scale: the features are cos and sin of 1000 * t times the frequencies
    # max_period^(-i / half), the first of which is 1.
    t = torch.tensor([0.0, 0.001, 0.37])
    emb = timestep_embedding(t, 8)
    freqs = 10000.0 ** (-torch.arange(4) / 4)
    args = 1000.0 * t[:, None] * freqs
    torch.testing.assert_close(emb, torch.cat([args.cos(), args.sin()], dim=-1))


def test_blocks_start_as_the_identity():
    # flow_head.py: each block's output linear starts at zero, so a new block is the identity for any
    # modulation (not only the zero one the zero-initialised modulation gives).
    head = tiny_head()
    x, shift, gain = torch.randn(3, 5, 32).unbind(0)
    for block in head.blocks:
        torch.testing.assert_close(block(x, shift, gain), x)
