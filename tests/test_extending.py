"""Custom sources: a vector a user's hook adds to the residual stream becomes an exact, scorable part."""

from __future__ import annotations

import pytest
import torch

from conftest import TOKENS, _variant
from tl_residual import decompose as D
from tl_residual import model as tlm
from tl_residual import query as Q
from tl_residual import scorers as S
from tl_residual.errors import InvalidInputError, UnsupportedArchitectureError

NAMES = ["hooked-gpt2", "hooked-llama-gqa", "bridge-gpt2", "bridge-llama-compat"]
POS = TOKENS.shape[1] - 1


def _steered_cache(model, hook_name, fn):
    with torch.no_grad(), model.hooks(fwd_hooks=[(hook_name, fn)]):
        _, cache = model.run_with_cache(TOKENS)
    return cache


@pytest.fixture
def clean_registry():
    yield
    for name in list(D.SOURCES):
        D.unregister_source(name)


@pytest.mark.parametrize("name", NAMES)
def test_steering_vector_source(name, clean_registry):
    model = _variant(name)
    steer = 0.5 * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    cache = _steered_cache(model, "blocks.0.hook_resid_post", lambda x, hook: x + steer)
    # unregistered: the decomposition says it is not exact
    assert D.reconstruction_error(model, cache, 1, POS, "resid_pre") > 1e-2
    D.register_source("steer", "blocks.0.hook_resid_post", lambda m, c, p, b: steer, kind="steering", model=model)
    for layer, stream in ((0, "resid_mid"), (0, "resid_post"), (1, "resid_pre"), (1, "resid_post")):
        for pos in (0, POS):
            assert D.reconstruction_error(model, cache, layer, pos, stream) < 1e-5, (layer, stream)
    kinds = [g.kind for g in D.iter_parts(model, cache, 1, POS, "resid_mid")]
    assert kinds.count("steering") == 1 and kinds.index("steering") == kinds.index("ffn_bias") + 1
    assert "steering" not in [g.kind for g in D.iter_parts(model, cache, 0, POS, "resid_mid")]
    table = D.decompose(model, cache, 1, POS)
    assert "steer" in set(table["name"]) and table.attrs["rel_error"] < 1e-5
    # scored like any part: log p(t | x + steer) - log p(t | x), x = resid_post_0 - steer, written out here
    ctx = S.make_context(model, cache, target=7)
    groups = [g for g in D.iter_parts(model, cache, -1, POS) if g.kind == "steering"]
    df = S.score_groups(ctx, groups, "log_prob_increase", n_top_tokens=0)
    assert list(df["name"]) == ["steer"]
    scale = cache["ln_final.hook_scale"][0, POS].reshape(-1)[0]

    def z(v):
        if model.cfg.normalization_type in ("LN", "LNPre"):
            v = v - v.mean()
        return (v * tlm.norm_weight(model, "final") / scale) @ model.W_U.detach()

    x = cache["blocks.0.hook_resid_post"][0, POS] - steer
    want = torch.log_softmax(z(x) + z(steer), -1)[7] - torch.log_softmax(z(x), -1)[7]
    assert df["score"][0] == pytest.approx(float(want), rel=1e-4, abs=1e-5)
    # the query side includes it and stays exact
    split = Q.split_ffn_neuron(model, cache, 1, 3, POS)
    assert "steer" in set(split["name"])
    for col in split.attrs["inputs"]:
        assert split.attrs["abs_error"][col] < 1e-4


@pytest.mark.parametrize("name", NAMES[:3])
def test_cached_hook_source_and_resid_pre0(name, clean_registry):
    """A source read from a cached hook (here: the hook adds layer 0's MLP output a second time), and one at
    blocks.0.hook_resid_pre, which the embedding check refuses until it is registered."""
    model = _variant(name)
    store = {}

    def keep(x, hook):
        store["mlp"] = x
        return x

    with (
        torch.no_grad(),
        model.hooks(
            fwd_hooks=[("blocks.0.hook_mlp_out", keep), ("blocks.0.hook_resid_post", lambda x, hook: x + store["mlp"])]
        ),
    ):
        _, cache = model.run_with_cache(TOKENS)
    assert D.reconstruction_error(model, cache, 1, POS, "resid_post") > 1e-3
    D.register_source("mlp0_again", "blocks.0.hook_resid_post", "blocks.0.hook_mlp_out", model=model)
    assert D.reconstruction_error(model, cache, 1, POS, "resid_post") < 1e-5
    D.unregister_source("mlp0_again")

    bump = torch.ones(model.cfg.d_model)
    cache = _steered_cache(model, "blocks.0.hook_resid_pre", lambda x, hook: x + bump)
    with pytest.raises(UnsupportedArchitectureError, match="hook_resid_pre"):
        D.reconstruction_error(model, cache, 0, POS, "resid_pre")
    D.register_source("bump", "blocks.0.hook_resid_pre", lambda m, c, p, b: bump, model=model)
    assert D.reconstruction_error(model, cache, 0, POS, "resid_pre") < 1e-5
    assert D.reconstruction_error(model, cache, 1, POS, "resid_post") < 1e-5


def test_source_scoped_to_model_and_errors(clean_registry):
    with pytest.raises(InvalidInputError, match="not a residual hook"):
        D.register_source("x", "blocks.0.hook_mlp_out", "blocks.0.hook_mlp_out")
    with pytest.raises(InvalidInputError, match="built-in part kind"):
        D.register_source("x", "blocks.0.hook_resid_post", "blocks.0.hook_mlp_out", kind="ffn_neuron")
    with pytest.raises(InvalidInputError, match="cache hook name or a callable"):
        D.register_source("x", "blocks.0.hook_resid_post", 3)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="no source named 'nope'"):
        D.unregister_source("nope")
    D.register_source("dup", "blocks.0.hook_resid_post", "blocks.0.hook_mlp_out")
    try:
        with pytest.raises(InvalidInputError, match="already registered.*overwrite=True"):
            D.register_source("dup", "blocks.0.hook_resid_post", "blocks.0.hook_attn_out")
        replaced = D.register_source("dup", "blocks.1.hook_resid_post", "blocks.0.hook_attn_out", overwrite=True)
        assert D.SOURCES["dup"] is replaced and replaced.layer == 1
    finally:
        D.unregister_source("dup")
    model = _variant("bridge-gpt2")
    D.register_source("bad", "blocks.0.hook_resid_post", lambda m, c, p, bb: torch.zeros(3), model=model)
    _, cache = model.run_with_cache(TOKENS)
    with pytest.raises(InvalidInputError, match=r"shape \(3,\)"):
        D.reconstruction_error(model, cache, 1, POS)
    D.unregister_source("bad")
    D.register_source("other", "blocks.0.hook_resid_post", lambda m, c, p, bb: torch.ones(1000), model=object())
    assert D.reconstruction_error(model, cache, 1, POS) < 1e-5  # scoped to another model: ignored
