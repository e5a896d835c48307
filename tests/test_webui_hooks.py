"""The pure parts of the A1111 CFG hook, against the host's documented layouts (host-notes a1111.md §2)."""

from __future__ import annotations

import torch

from lib_deltasampling.webui.hooks_cfg import batch_rows, eps_to_x0, step_index, unexpanded, vp_to_ve, x0_to_eps


def test_unexpanded_rows_with_and_prompts():
    """B=2, image 0 prompt `a AND b` (2 cond rows), image 1 one prompt: x_in = [x0, x0, x1 | x0, x1]."""
    x0, x1 = torch.full((1, 4, 2, 2), 0.0), torch.full((1, 4, 2, 2), 1.0)
    x_in = torch.cat([x0, x0, x1, x0, x1])
    sigma_in = torch.tensor([5.0, 5.0, 6.0, 5.0, 6.0])
    x, sigma = unexpanded(x_in, sigma_in, batch=2)
    assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(sigma, torch.tensor([5.0, 6.0]))


def test_batch_rows_of_tensor_and_sdxl_dict_conds():
    assert batch_rows(torch.zeros(3, 77, 768)) == 3
    assert batch_rows({"crossattn": torch.zeros(2, 77, 2048), "vector": torch.zeros(2, 2816)}) == 2


def test_step_index_first_and_second_order():
    assert [step_index(c, 5, 5) for c in range(5)] == [0, 1, 2, 3, 4]
    # A1111 counts 2 calls per step for second-order samplers (total_steps = 2 * steps); Heun makes
    # 2 calls per step and 1 on the last: calls 0..8 of 5 steps
    assert [step_index(c, 10, 5) for c in range(9)] == [0, 0, 1, 1, 2, 2, 3, 3, 4]


def test_timestep_sampler_conversions_by_hand():
    """VP: x_t = sqrt(a) x0 + sqrt(1 - a) n with a = 1 / (1 + sigma^2)."""
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    sigma = torch.tensor([0.5, 7.0])
    a = (1 / (1 + sigma ** 2)).reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * n
    x_ve = vp_to_ve(x_t, sigma)
    assert torch.allclose(x_ve, x0 + sigma.reshape(-1, 1, 1, 1) * n, atol=1e-5)
    assert torch.allclose(eps_to_x0(x_ve, n, sigma), x0, atol=1e-4)
    assert torch.allclose(x0_to_eps(x_ve, x0, sigma), n, atol=1e-4)
