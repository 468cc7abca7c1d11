"""compile: auto | true | false (models/compile.py): compiled DiT and conv-decoder units give the eager outputs and
gradients, compile without graph breaks, and do not recompile over new t, labels and batch contents."""
from __future__ import annotations

import pytest
import torch

from dmvae_scale.config import ConfigError, DecoderConfig, DiTConfig, RunConfig, from_dict
from dmvae_scale.models.compile import compile_model_parts, compile_wanted
from dmvae_scale.models.conv import ConvDecoder
from dmvae_scale.models.dit import LightningDiT


def _randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.2)
    return module


def _tiny_dit() -> LightningDiT:
    cfg = DiTConfig(depth=2, hidden_size=32, num_heads=2, input_size=4, in_channels=4, num_classes=5)
    return _randomized(LightningDiT(cfg))


def _tiny_decoder() -> ConvDecoder:
    cfg = DecoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, mid_attention=True)
    return _randomized(ConvDecoder(cfg, latent_channels=4, out_channels=3, factor=2))


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _fresh_counters():
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return torch._dynamo.utils.counters


@pytest.mark.unit
def test_compile_setting_auto_is_on_for_cuda_off_on_cpu_and_bad_values_are_named():
    assert compile_wanted("auto", torch.device("cuda")) is True
    assert compile_wanted("auto", torch.device("cpu")) is False
    assert compile_wanted("auto", torch.device("cuda"), zero_stage=3) is False
    assert compile_wanted(True, torch.device("cpu")) is True and compile_wanted(False, torch.device("cuda")) is False
    assert from_dict(RunConfig, {"distributed": {"compile": True}}).distributed.compile is True
    assert RunConfig().distributed.compile == "auto"
    with pytest.raises(ConfigError, match=r"distributed\.compile.*'auto', True, False.*'yes'"):
        from_dict(RunConfig, {"distributed": {"compile": "yes"}})


@pytest.mark.unit
def test_dit_encodings_are_cached_and_outputs_unchanged():
    model = _tiny_dit()
    x, t, y = torch.randn(3, 4, 4, 4), torch.rand(3), torch.tensor([0, 1, 5])
    first = model(x, t, y)
    cache = model.__dict__["_encoding_cache"]
    assert len(cache) == 1
    (pos, rope), = cache.values()
    assert torch.equal(model(x, t, y), first) and len(cache) == 1  # the second call reuses the tables
    from dmvae_scale.models.layers import rope_2d_tables, sincos_pos_embed_2d
    assert torch.equal(pos, sincos_pos_embed_2d(model.grid, model.hidden_size))
    for cached, fresh in zip(rope, rope_2d_tables(model.grid, model.hidden_size // model.num_heads)):
        assert torch.equal(cached, fresh)
    with torch.inference_mode():
        model(x, t, y)
    loss = model(x, t, y).square().mean()  # tables from inference mode are not reused under autograd
    loss.backward()
    assert len(cache) == 2


@pytest.mark.integration
def test_compiled_dit_matches_eager_without_graph_breaks_or_recompiles():
    eager, compiled = _tiny_dit(), _tiny_dit()
    assert compile_model_parts(compiled, fullgraph=True) == 2 + 3  # two blocks, the final layer, two embedders
    counters = _fresh_counters()  # fullgraph=True above: a graph break in a unit is an error
    gen = torch.Generator().manual_seed(1)
    for step in range(4):  # same shapes, new t, labels and contents each step
        x = torch.randn(3, 4, 4, 4, generator=gen)
        t = torch.rand(3, generator=gen)
        y = torch.randint(0, 6, (3,), generator=gen)
        for model in (eager, compiled):
            model.zero_grad()
            out = model(x, t, y)
            out.square().mean().backward()
        torch.testing.assert_close(compiled(x, t, y), eager(x, t, y), rtol=1e-3, atol=1e-4)
        for name, grad in _grads(eager).items():
            torch.testing.assert_close(_grads(compiled)[name], grad, rtol=1e-3, atol=1e-4, msg=name)
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs == 4  # block, final, t and y embedders: one graph each
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["recompiles"] == {} or sum(counters["recompiles"].values()) == 0
    assert set(dict(compiled.named_parameters())) == set(dict(eager.named_parameters()))  # checkpoints unchanged


@pytest.mark.integration
def test_compiled_conv_decoder_matches_eager_without_graph_breaks_or_recompiles():
    eager, compiled = _tiny_decoder(), _tiny_decoder()
    assert compile_model_parts(compiled, fullgraph=True) == 3 + 3  # middle: resnet, attention, resnet; levels: resnet+up, resnet
    counters = _fresh_counters()  # fullgraph=True above: a graph break in a unit is an error
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        z = torch.randn(2, 4, 4, 4, generator=gen)
        for model in (eager, compiled):
            model.zero_grad()
            model(z).square().mean().backward()
        torch.testing.assert_close(compiled(z), eager(z), rtol=1e-3, atol=1e-4)
        for name, grad in _grads(eager).items():
            torch.testing.assert_close(_grads(compiled)[name], grad, rtol=1e-3, atol=1e-4, msg=name)
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert set(dict(compiled.named_parameters())) == set(dict(eager.named_parameters()))
