"""The residual-stream paper's dense analyses read a study's stored FFN scores instead of recomputing them, and
refuse stored scores that do not match the prompt (tiny GPT-2-shaped model; the study of tests/test_analyses.py
stores every FFN neuron)."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
from test_analyses import study, tiny

from tl_residual import analyses as A
from tl_residual.errors import InvalidInputError


def _prompts_only(s: SimpleNamespace) -> pd.DataFrame:
    return s.prompts[["prompt_id", "group", "prompt", "target_id"]]


def test_stored_scores_give_the_computed_answer():
    s, model = study(), tiny()
    stored, _ = A.subvalue_additivity(model, s)
    computed, _ = A.subvalue_additivity(model, _prompts_only(s))
    pd.testing.assert_frame_equal(stored, computed, check_exact=False, atol=1e-4, rtol=1e-4)
    stored, _ = A.top10_share(model, s, k=2)
    computed, _ = A.top10_share(model, _prompts_only(s), k=2)
    pd.testing.assert_frame_equal(stored, computed, check_exact=False, atol=1e-4, rtol=1e-4)
    roles = A.ffn_value_query_roles(model, s, n_value=2, n_query=3, n_union=2, k=5)
    again = A.ffn_value_query_roles(model, _prompts_only(s), n_value=2, n_query=3, n_union=2, k=5)
    pd.testing.assert_frame_equal(roles, again, check_exact=False, atol=1e-4, rtol=1e-4)


def _with_parts(s: SimpleNamespace, parts: pd.DataFrame) -> SimpleNamespace:
    return SimpleNamespace(**{**vars(s), "parts": parts})


def test_stored_scores_that_do_not_match_raise():
    s, model = study(), tiny()
    ffn = (s.parts.kind == "ffn_neuron") & (s.parts.method == "log_prob_increase") & (s.parts.prompt_id == 0)
    best = s.parts[ffn & (s.parts.layer == 0)]["score"].idxmax()
    wrong = s.parts.copy()
    wrong.loc[best, "score"] += 0.5
    with pytest.raises(InvalidInputError, match="do not match"):
        A.subvalue_additivity(model, _with_parts(s, wrong))
    missing = s.parts.drop(index=best)
    with pytest.raises(InvalidInputError, match="ffn_neuron=all"):
        A.top10_share(model, _with_parts(s, missing))
