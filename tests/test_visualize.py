"""The flow graph, the plots and the HTML report: structure, numbers against independent dense computations, errors.

The browser checks (rendering, node count in the DOM, no JavaScript error, no network request) are in
tests/test_browser.py.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from conftest import HAS_HOOKED, TOKENS, make_bridge, make_hooked, run_cache
from tl_residual import visualize as V
from tl_residual.errors import InvalidInputError

N_POS = TOKENS.shape[1]


def _gpt2():
    """A GPT-2-style random model (no GQA): HookedTransformer where available, else a bridge."""
    return make_hooked("gpt2", n_layers=3) if HAS_HOOKED else make_bridge("gpt2", n_layers=3)


@pytest.fixture(scope="module")
def gpt2():
    model = _gpt2()
    _, cache = run_cache(model)
    return model, cache


def _raw_imp(model, x, vectors, target):
    """Independent log-prob increase under the "none" lens: log_softmax((x + v) @ W_U)[t] - same for x (nats)."""
    W_U = model.W_U.detach().float()
    base = torch.log_softmax(x @ W_U, -1)[target]
    return torch.log_softmax((x[None] + vectors) @ W_U, -1)[:, target] - base


def _subvalues(model, cache, layer, pos):
    """pattern[h, pos, p] * (v[p, h] @ W_O[h]) for every head and source, [head, src, d_model] (no GQA)."""
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, pos, : pos + 1]
    v = cache[f"blocks.{layer}.attn.hook_v"][0, : pos + 1]  # [src, head, d_head]
    w_o = model.blocks[layer].attn.W_O.detach().float()  # [head, d_head, d_model]
    return pattern[..., None] * torch.einsum("shd,hdm->hsm", v.float(), w_o)


def test_structure_counts_and_left_to_right(variant_model):
    _, cache = run_cache(variant_model)
    n_layers, n_heads = variant_model.cfg.n_layers, variant_model.cfg.n_heads
    g = V.flow_graph(variant_model, cache, layers=None, n_memory=2, n_attn_neurons=2, n_neurons=3, tokens=TOKENS)
    nodes, edges = g.nodes, g.edges
    layers = list(range(max(0, n_layers - 2), n_layers))
    assert g.meta["layers"] == layers
    counts = nodes["kind"].value_counts().to_dict()
    L = len(layers)
    assert counts["resid_pre"] == 1 and counts["resid_mid"] == L and counts["resid_post"] == L
    assert counts["ln1"] == counts["ln2"] == counts["attn_out"] == counts["mlp_out"] == L
    assert counts["query"] == counts["head"] == L * n_heads
    assert counts["memory_value"] == L * n_heads * 2
    assert counts["attn_neuron"] == L * 4 and counts["ffn_neuron"] == L * 6
    assert nodes["id"].is_unique
    ids = set(nodes["id"])
    assert set(edges["source"]) <= ids and set(edges["target"]) <= ids
    x = dict(zip(nodes["id"], nodes["x"]))
    assert all(x[s] < x[t] for s, t in zip(edges["source"], edges["target"])), "edges must point left to right"
    # memory values carry their source token; every d_model node has a label, probability and rank
    mem = nodes[nodes["kind"] == "memory_value"]
    assert all(f"t{int(TOKENS[0, p])}" == s for p, s in zip(mem["src_pos"], mem["src_token"]))
    proj = nodes[nodes["kind"] != "query"]
    assert proj["target_prob"].between(0, 1).all() and (proj["target_rank"] >= 1).all()
    assert (proj["label"].str.len() > 0).all()
    both = g.to_dataframe()
    assert (both["element"] == "node").sum() == len(nodes) and (both["element"] == "edge").sum() == len(edges)


def test_final_node_is_the_models_prediction(variant_model):
    logits, cache = run_cache(variant_model)
    g = V.flow_graph(variant_model, cache, layers=-1, n_attn_neurons=0)
    probs = torch.softmax(logits[0, -1].float(), -1)
    target = int(probs.argmax())
    assert g.meta["target"] == target
    last = g.nodes.set_index("id").loc[f"L{variant_model.cfg.n_layers - 1}.resid_post"]
    assert last["target_rank"] == 1
    assert math.isclose(last["target_prob"], float(probs[target]), rel_tol=1e-4, abs_tol=1e-5)


@pytest.mark.parametrize("prune", V.PRUNE_RULES)
def test_pruning_and_scores_match_dense(gpt2, prune):
    model, cache = gpt2
    pos, layer, target = N_POS - 1, 2, 7
    g = V.flow_graph(
        model,
        cache,
        target=target,
        layers=[layer],
        prune=prune,
        n_memory=2,
        n_neurons=3,
        n_attn_neurons=0,
        convention="none",
    )
    nodes = g.nodes.set_index("id")
    sub = _subvalues(model, cache, layer, pos)  # [head, src, d_model]
    x_pre = cache[f"blocks.{layer}.hook_resid_pre"][0, pos].float()
    imp = _raw_imp(model, x_pre, sub.reshape(-1, sub.shape[-1]), target).reshape(sub.shape[:2])
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, pos, : pos + 1]
    for h in range(model.cfg.n_heads):
        key = pattern[h] if prune == "activation" else imp[h].abs()
        expected = set(torch.topk(key, 2).indices.tolist())
        drawn = nodes[(nodes["kind"] == "memory_value") & (nodes["head"] == h)]
        assert set(drawn["src_pos"]) == expected
        for p, row in zip(drawn["src_pos"], drawn.itertuples()):
            assert math.isclose(row.log_prob_increase, float(imp[h, p]), rel_tol=1e-3, abs_tol=1e-5)
            assert math.isclose(row.coefficient, float(pattern[h, p]), rel_tol=1e-5)
        # the query -> memory value edges carry the attention weight
        e = g.edges[(g.edges["source"] == f"L{layer}.H{h}.q")]
        assert sorted(e["value"].round(5)) == sorted(round(float(pattern[h, p]), 5) for p in expected)
    # FFN neurons: top and bottom by log-prob increase, or by activation (VISIT: highest and lowest m)
    x_mid = cache[f"blocks.{layer}.hook_resid_mid"][0, pos].float()
    m = cache[f"blocks.{layer}.mlp.hook_post"][0, pos].float()
    w_out = model.blocks[layer].mlp.W_out.detach().float()
    ffn_imp = _raw_imp(model, x_mid, m[:, None] * w_out, target)
    key = m if prune == "activation" else ffn_imp
    expected = set(torch.topk(key, 3).indices.tolist()) | set(torch.topk(key, 3, largest=False).indices.tolist())
    drawn = nodes[nodes["kind"] == "ffn_neuron"]
    assert set(drawn["neuron"]) == expected
    for k, lpi in zip(drawn["neuron"], drawn["log_prob_increase"]):
        assert math.isclose(lpi, float(ffn_imp[k]), rel_tol=1e-3, abs_tol=1e-5)


def test_n_heads_keeps_the_heads_with_largest_abs_log_prob_increase(gpt2):
    model, cache = gpt2
    pos, layer, target = N_POS - 1, 1, 11
    g = V.flow_graph(
        model,
        cache,
        target=target,
        layers=[layer],
        n_heads=2,
        n_memory=1,
        n_attn_neurons=0,
        n_neurons=0,
        convention="none",
    )
    sub = _subvalues(model, cache, layer, pos)
    x_pre = cache[f"blocks.{layer}.hook_resid_pre"][0, pos].float()
    imp = _raw_imp(model, x_pre, sub.sum(1), target)
    assert set(g.nodes[g.nodes["kind"] == "head"]["head"]) == set(torch.topk(imp.abs(), 2).indices.tolist())
    assert (g.nodes["kind"] == "query").sum() == 2 and (g.nodes["kind"] == "memory_value").sum() == 2


def test_earlier_position_and_prompt_text(gpt2):
    model, cache = gpt2
    logits, _ = run_cache(model)
    g = V.flow_graph(model, cache, layers=[2], position=3, n_attn_neurons=1)
    assert g.meta["position"] == 3 and (g.nodes["src_pos"] <= 3).all()
    probs = torch.softmax(logits[0, 3].float(), -1)
    final = g.nodes.set_index("id").loc["L2.resid_post"]
    assert final["target_rank"] == 1 and math.isclose(final["target_prob"], float(probs.max()), rel_tol=1e-4)
    from_text = V.flow_graph(model, "t5 t33 t42", layers=[2], n_attn_neurons=0)
    assert set(from_text.nodes["src_token"]) - {""} <= {"t1", "t5", "t33", "t42"}


def test_head_nodes_sum_their_subvalues(gpt2):
    model, cache = gpt2
    pos, layer = N_POS - 1, 1
    g = V.flow_graph(model, cache, layers=[layer], n_attn_neurons=0, n_neurons=0, convention="none")
    heads = g.nodes[g.nodes["kind"] == "head"].set_index("head")
    sub = _subvalues(model, cache, layer, pos)
    for h in range(model.cfg.n_heads):
        assert math.isclose(heads.loc[h, "norm"], float(sub[h].sum(0).norm()), rel_tol=1e-4)


def test_attention_neurons_hang_off_drawn_memory_values(gpt2):
    model, cache = gpt2
    g = V.flow_graph(model, cache, layers=[2], n_memory=1, n_attn_neurons=3, n_neurons=0)
    nodes = g.nodes.set_index("id")
    an = g.nodes[g.nodes["kind"] == "attn_neuron"]
    assert 1 <= len(an) <= 6
    for row in an.itertuples():
        parent = f"L2.H{row.head}.p{row.src_pos}"
        assert parent in nodes.index and nodes.loc[parent, "kind"] == "memory_value"
        assert ((g.edges["source"] == parent) & (g.edges["target"] == row.id)).any()
        assert row.id == f"L2.H{row.head}.d{row.dim}.p{row.src_pos}"


def test_bad_input_is_a_clear_error(gpt2):
    model, cache = gpt2
    with pytest.raises(InvalidInputError, match="prune"):
        V.flow_graph(model, cache, prune="norm")
    with pytest.raises(InvalidInputError, match="consecutive"):
        V.flow_graph(model, cache, layers=[0, 2])
    with pytest.raises(InvalidInputError, match="out of range"):
        V.flow_graph(model, cache, layers=[5])
    with pytest.raises(InvalidInputError, match="n_neurons"):
        V.flow_graph(model, cache, n_neurons=-1)
    with pytest.raises(InvalidInputError, match="n_heads"):
        V.flow_graph(model, cache, n_heads=99)
    with pytest.raises(InvalidInputError, match="projection"):
        V.flow_graph(model, cache, projection="tuned")
    with pytest.raises(InvalidInputError, match="tokens"):
        V.flow_graph(model, cache, tokens=["a", "b"])
    with pytest.raises(InvalidInputError, match="position"):
        V.flow_graph(model, cache, position=N_POS)
    with pytest.raises(InvalidInputError, match="not one"):
        V.flow_graph(model, cache, target="t3 t4")
    with pytest.raises(InvalidInputError, match="empty"):
        V.flow_graph(model, "  ")


def test_html_is_self_contained(gpt2):
    model, cache = gpt2
    g = V.flow_graph(model, cache, layers=[2], tokens=TOKENS)
    page = g.to_html()
    assert not re.search(r"<(script|link)[^>]*(src|href)=", page), "the page must not load anything"
    assert len(page) > 3_000_000  # plotly.js embedded
    assert "Plotly.newPlot" in g._repr_html_()
    fig = g.figure()
    n_drawn = sum(len(t.x) for t in fig.data if t.meta == "node")
    assert n_drawn == len(g.nodes)


def test_bs_value_plots_match_dense(gpt2):
    """Fig. 9 and Fig. 10 plots against resid @ W_U and (layer output - bias) @ (W_U[:, a] - W_U[:, b])."""
    model, cache = gpt2
    W_U = model.W_U.detach().float()
    n_layers = model.cfg.n_layers
    fig = V.bs_value_trajectory_figure(model, cache, [3, 9], convention="none")
    assert [t.name for t in fig.data] == ["'t3'", "'t9'"]
    stream = [cache["blocks.0.hook_resid_pre"][0, -1]] + [
        cache[f"blocks.{l}.hook_resid_{s}"][0, -1] for l in range(n_layers) for s in ("mid", "post")
    ]
    expected = torch.stack(stream).float() @ W_U[:, 9]
    assert list(fig.data[1].y) == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-4)
    assert list(fig.layout.xaxis.ticktext)[:3] == ["Lin0", "Lres0", "Lout0"]
    fig = V.bs_value_minus_figure(model, cache, 3, 9, convention="none")
    attn, mlp = fig.data
    assert list(mlp.x) == list(range(n_layers))
    for l in range(n_layers):
        b_out = getattr(model.blocks[l].mlp, "b_out", None)
        v = cache[f"blocks.{l}.hook_mlp_out"][0, -1].float() - (b_out.detach().float() if b_out is not None else 0)
        assert mlp.y[l] == pytest.approx(float(v @ (W_U[:, 3] - W_U[:, 9])), rel=1e-4, abs=1e-4)
    with pytest.raises(InvalidInputError):
        V.bs_value_trajectory_figure(model, cache, [])
    with pytest.raises(InvalidInputError):
        V.bs_value_minus_figure(model, cache, "t3 t4", 9)


def test_layer_contributions_figure_shows_score_layers(gpt2):
    from tl_residual.scorers import make_context, score_layers

    model, cache = gpt2
    table = score_layers(make_context(model, cache))
    fig = V.layer_contributions_figure(table)
    attn = [t for t in fig.data if t.name == "attention output"][0]
    assert list(attn.y) == pytest.approx(table[table["kind"] == "attn"].sort_values("layer")["score"].tolist())
    with pytest.raises(InvalidInputError, match="columns"):
        V.layer_contributions_figure(table.drop(columns=["kind"]))


@pytest.mark.parametrize("convention", ["frozen", "recomputed"])
def test_write_report_random_model(gpt2, tmp_path, convention):
    from tl_residual import explain

    model, _ = gpt2
    result = explain(model, "t5 t33 t42 t8", top_k=3, convention=convention)
    path = V.write_report(model, result, str(tmp_path / "r.html"), layers=[1, 2], n_neurons=2)
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert path == str(tmp_path / "r.html")
    for div in (
        "flow-graph-L1",
        "flow-graph-L2",
        "layer-contributions",
        "bs-trajectories",
        "bs-minus",
        "parts-table",
        "nodes-table",
    ):
        assert f'id="{div}"' in page
    assert page.count("Plotly.newPlot(") == 6 and not re.search(r"<(script|link)[^>]*(src|href)=", page)
    # the tables read cleanly: a source-token column, no NaN / -1 placeholders, no bare 0.0000 probability
    tables = page[page.index('id="attention-table"') :]
    assert "source token" in tables and ">nan<" not in tables.lower() and ">-1<" not in tables
    assert ">0.0000<" not in page[page.index('id="nodes-table"') :]
    shown = result._repr_html_()  # the notebook display: token lists as text, and where the graph is
    assert "write_report" in shown and "[&#x27;" not in shown and "['" not in shown.split("<h4>")[1]
    result.cache = None  # without the cache the report reruns the model: same flow graph
    again = V.report_html(model, result, layers=[1, 2], n_neurons=2)
    assert again.count("<tr>") == page.count("<tr>")
    with pytest.raises(InvalidInputError, match="prune"):
        V.write_report(model, result, str(tmp_path / "bad.html"), prune="size")


def test_default_graph_layers_are_the_top_scoring_layers(gpt2):
    from tl_residual import explain

    model, _ = gpt2
    result = explain(model, "t5 t33 t42 t8", top_k=3)
    by_abs = result.layers.assign(a=result.layers["score"].abs()).sort_values("a", ascending=False)
    expected = sorted(list(dict.fromkeys(int(l) for l in by_abs["layer"]))[:2])
    assert V.default_graph_layers(result.layers) == expected
    assert V.default_graph_layers(result.layers, 1) == [int(by_abs["layer"].iloc[0])]
    page = V.report_html(model, result, n_neurons=1, n_attn_neurons=0)
    assert all(f'id="flow-graph-L{l}"' in page for l in expected)
    with pytest.raises(InvalidInputError, match="positive"):
        V.default_graph_layers(result.layers, 0)


def test_display_table_has_src_token_and_no_placeholders():
    import pandas as pd

    df = pd.DataFrame(
        {
            "name": ["L1.H0.p2", "L1.mlp"],
            "head": [0, -1],
            "src_pos": [2, -1],
            "score": [0.5, float("nan")],
            "target_prob": [1e-7, 0.25],
            "top_tokens": [["a", " b"], []],
        }
    )
    shown = V.display_table(
        df,
        ["name", "head", "src_pos", "src_token", "score", "target_prob", "top_tokens"],
        tokens=["<bos>", "x", " Paris"],
    )
    assert list(shown["src_token"]) == ["' Paris'", ""] and list(shown["head"]) == ["0", ""]
    assert list(shown["score"]) == ["+0.5000", ""] and list(shown["target_prob"]) == ["1.0e-07", "0.2500"]
    assert shown.loc[0, "top_tokens"] == "'a' ' b'"


def test_colourings_and_faded_attention_sink(gpt2):
    model, cache = gpt2
    g = V.flow_graph(model, cache, layers=[2], n_memory=N_POS, n_attn_neurons=0, n_neurons=2, tokens=TOKENS)
    fig = g.figure("sign")
    node_trace = next(i for i, t in enumerate(fig.data) if t.meta == "node" and t.name == "nodes")
    buttons = fig.layout.updatemenus[0].buttons
    assert [list(b.args[1]) for b in buttons] == [[node_trace]] * len(V.COLOURINGS)
    proj = g.nodes[g.nodes["kind"] != "query"].reset_index(drop=True)
    colours = fig.data[node_trace].marker.color
    for kind, c, col in zip(proj["kind"], proj["coefficient"], colours):
        if kind == "ffn_neuron":
            assert col == ("#d62728" if c > 0 else "#1f77b4")
    opacity = fig.data[node_trace].marker.opacity
    sink = (proj["kind"] == "memory_value") & (proj["src_pos"] == 0)
    assert sink.any() and all((o < 1) == s for o, s in zip(opacity, sink))
    labels = [a for a in fig.layout.annotations if a.name == "label"]
    assert len(labels) == len(g.nodes)
    with pytest.raises(InvalidInputError, match="colour"):
        g.figure("viridis")


@pytest.mark.real_model
def test_smollm2_paris_flow_graph(paris):
    model, cache, tokens = paris
    g = V.flow_graph(model, cache, layers=[29], n_attn_neurons=0, n_neurons=2, tokens=tokens)
    nodes = g.nodes.set_index("id")
    assert g.meta["target_token"] == " Paris"
    assert nodes.loc["L29.resid_post", "label"] == " Paris" and nodes.loc["L29.resid_post", "target_rank"] == 1
    assert 0.70 < nodes.loc["L29.resid_post", "target_prob"] < 0.80
    mem = g.nodes[g.nodes["kind"] == "memory_value"]
    assert set(mem["src_token"]) <= {"<|im_start|>", "The", " capital", " of", " France", " is"}
    assert len(g.nodes[g.nodes["kind"] == "query"]) == 9
