"""Recipe: JSON round trip, key precedence (exact > regex > _default), strictness."""

import pytest

from llmpareto.errors import UserError
from llmpareto.recipe import Recipe


def test_json_round_trip_keeps_everything():
    r = Recipe({"model.layers.0.mlp.down_proj": {"format": "q8_0"},
                "re:.*self_attn.*": {"format": "q4_0", "sparsity": 0.5, "pattern": "2:4"},
                "model.embed_tokens": None,
                "_default": {"format": "q5_1"}},
               structure={"layers": [0, 2, 3], "mlp_ratio": 0.75, "heads": 6})
    back = Recipe.from_json(r.to_json())
    assert back == r
    assert back.to_dict()["version"] == 1
    assert list(back.modules) == list(r.modules)  # order matters for regex keys


def test_exact_beats_regex_beats_default():
    r = Recipe({"re:.*mlp.*": {"format": "q4_0"}, "re:.*": {"format": "q8_0"},
                "model.layers.1.mlp.up_proj": {"format": "f16"}, "_default": {"format": "tq2_0"}})
    assert r.format_of("model.layers.1.mlp.up_proj") == "f16"
    assert r.format_of("model.layers.0.mlp.up_proj") == "q4_0"  # first regex in order
    assert r.format_of("model.layers.0.self_attn.q_proj") == "q8_0"
    assert Recipe({"_default": {"format": "q4_1"}}).format_of("anything") == "q4_1"
    assert Recipe({"x": {"format": "q4_1"}}).format_of("y") is None
    assert Recipe({"re:model\\.layers\\.1": {"format": "q4_1"}}).format_of(
        "model.layers.10") is None  # regex keys must match the whole name


@pytest.mark.parametrize("bad, match", [
    ({"modules": {"a": {"fmt": "q4_0"}}}, "unknown key"),
    ({"modules": {"a": {"format": "q9_9"}}}, "unknown weight format"),
    ({"modules": {"re:(": {"format": "q4_0"}}}, "not a valid regex"),
    ({"modules": {"a": {"pattern": "7:3"}}}, "pattern"),  # N >= M
    ({"modules": {}, "structure": {"depth": 3}}, "structure"),
    ({"modules": {}, "extra": 1}, "unknown key"),
    ({"version": 99, "modules": {}}, "newer"),
])
def test_bad_recipes_are_refused_with_a_reason(bad, match):
    with pytest.raises(UserError, match=match):
        Recipe.from_dict(bad)


def test_not_json_is_a_user_error():
    with pytest.raises(UserError, match="not valid JSON"):
        Recipe.from_json("{nope")
