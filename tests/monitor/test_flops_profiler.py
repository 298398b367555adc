"""The flops profiler: counts of small models equal the analytic numbers; DeepSpeed's printout and engine hook."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monitor_runs import train_tiny
from torch import nn

from deepshard.profiling.flops_profiler import FlopsProfiler, get_model_profile
from deepshard.testing.models import GPT, PRESETS


def profile(model: nn.Module, *args: torch.Tensor) -> FlopsProfiler:
    prof = FlopsProfiler(model)
    prof.start_profile()
    with torch.no_grad():
        model(*args)
    prof.stop_profile()
    return prof


def test_linear_exact() -> None:
    prof = profile(nn.Linear(32, 16), torch.randn(4, 7, 32))
    macs = 4 * 7 * 32 * 16
    assert prof.get_total_macs() == macs and prof.get_total_flops() == 2 * macs
    assert prof.get_total_params() == 32 * 16 + 16


def test_conv_exact() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1, stride=2, bias=False)
    prof = profile(conv, torch.randn(2, 3, 16, 16))
    macs = 2 * 8 * 8 * 8 * 3 * 3 * 3  # N * C_out * H_out * W_out * C_in * k * k
    assert prof.get_total_macs() == macs and prof.get_total_flops() == 2 * macs


class Attention(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_attention_exact() -> None:
    b, h, s, d = 2, 4, 32, 8
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    prof = profile(Attention(), q, k, v)
    macs = 2 * b * h * s * s * d  # Q K^T and A V; the causal mask does not change the count
    assert prof.get_total_macs() == macs and prof.get_total_flops() == 2 * macs


def test_gpt_matches_analytic_count_per_module() -> None:
    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    model = GPT(cfg)
    b, t, dm, ff, L, V, H = 2, cfg.seq_len, cfg.d_model, cfg.ff, cfg.n_layers, cfg.vocab_size, cfg.n_heads
    n = b * t
    prof = profile(model, torch.randint(0, V, (b, t)))
    linear = n * (dm * 3 * dm + dm * dm + 2 * dm * ff)
    attention = 2 * b * H * t * t * (dm // H)
    macs = L * (linear + attention) + n * dm * V
    # non-MAC flops (DeepSpeed's formulas): 5 per element for each of 2L+1 affine layer norms, 1 per GELU input
    flops = 2 * macs + 5 * n * dm * (2 * L + 1) + L * n * ff
    assert prof.get_total_macs() == macs
    assert prof.get_total_flops() == flops
    per = prof.profiles()
    assert per["blocks.0.qkv"].macs == n * dm * 3 * dm
    assert per["blocks.1"].macs == linear + attention
    assert per["head"].macs == n * dm * V
    assert per["blocks"].duration > 0 and per["blocks"].duration >= per["blocks.0"].duration


def test_printout_and_get_model_profile(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    out = tmp_path / "prof.txt"
    flops, macs, params = get_model_profile(model, input_shape=(3, 8), top_modules=2, output_file=str(out))
    # MACs 3*8*16 + 3*16*4; flops 2 * MACs + 48 ReLU elements; params 8*16+16 + 16*4+4
    assert (flops, macs, params) == ("1.2 K", "576 MACs", "212")
    text = out.read_text()
    for line in ("-------------------------- DeepSpeed Flops Profiler --------------------------",
                 "Profile Summary at step 1:", "fwd MACs per GPU:", "depth 0:",
                 "(0): Linear(144 = 67.92% Params, 384 MACs = 66.67% MACs",
                 "(1): ReLU(0 = 0% Params, 0 MACs = 0% MACs"):  # fmt: skip
        assert line in text, line
    raw = get_model_profile(model, args=[torch.ones(3, 8)], print_profile=False, as_string=False)
    assert raw == (1200, 576, 212)


def test_engine_profiles_profile_step_once(monkeypatch, tmp_path) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "flops.txt"
    train_tiny(
        {
            "flops_profiler": {"enabled": True, "profile_step": 1, "output_file": str(out)},
            "wall_clock_breakdown": True,
        },
        steps=3,
    )
    text = out.read_text()
    assert "Profile Summary at step 1:" in text and "batch size per GPU:" in text and "bwd latency:" in text
    assert text.count("DeepSpeed Flops Profiler") == 1
    cfg = PRESETS["tiny"]
    n = 2 * cfg.seq_len  # micro-batch 2
    assert (
        f"(qkv): Linear(12.29 K = 10.22% Params, {round(n * cfg.d_model * 3 * cfg.d_model / 1e6, 2):g} MMACs"
        in text
    )
