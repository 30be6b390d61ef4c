"""Registry: build from {name, args}, defaults from `extra`, helpful unknown-name errors."""

from __future__ import annotations

import pytest

from mltrain.errors import ConfigError, MltrainError
from mltrain.registry import Registry


def _make() -> Registry:
    reg = Registry("widget")

    @reg.register("pair")
    def pair(a, b=10):
        return (a, b)

    reg.register("triple", lambda x, y, z: x + y + z)
    return reg


def test_build_with_args():
    reg = _make()
    assert reg.build({"name": "pair", "args": {"a": 1, "b": 2}}) == (1, 2)
    assert reg.build({"name": "triple", "args": {"x": 1, "y": 20, "z": 300}}) == 321


def test_build_without_args_key_uses_function_defaults():
    reg = _make()
    assert reg.build({"name": "pair", "args": {"a": 5}}) == (5, 10)
    assert reg.build({"name": "pair", "args": None}, a=7) == (7, 10)


def test_extra_fills_missing_args_but_config_wins():
    reg = _make()
    assert reg.build({"name": "pair"}, a=3) == (3, 10)
    assert reg.build({"name": "pair", "args": {"b": 4}}, a=3, b=99) == (3, 4)
    assert reg.build({"name": "pair", "args": {"a": 1}}, a=3) == (1, 10)


def test_register_returns_function_so_decorator_keeps_name():
    reg = Registry("thing")

    @reg.register("f")
    def f():
        return 42

    assert f() == 42
    assert reg.get("f") is f
    assert "f" in reg and "g" not in reg


def test_names_are_sorted():
    reg = Registry("thing")
    for n in ("zeta", "alpha", "mid"):
        reg.register(n, lambda: None)
    assert reg.names() == ["alpha", "mid", "zeta"]


def test_unknown_name_lists_valid_names():
    reg = _make()
    with pytest.raises(ConfigError) as info:
        reg.build({"name": "pear"})
    msg = str(info.value)
    assert "widget" in msg and "'pear'" in msg
    assert "pair, triple" in msg
    assert isinstance(info.value, MltrainError)


def test_get_unknown_raises_config_error():
    with pytest.raises(ConfigError, match="valid names: pair, triple"):
        _make().get("nope")


def test_a_near_miss_is_named():
    """A near miss such as `TripletMarginLos` gets a suggestion, not a list of 38 losses."""
    with pytest.raises(ConfigError) as info:
        _make().get("Tripple")
    assert str(info.value) == (
        "unknown widget 'Tripple' (did you mean triple?); valid names: pair, triple"
    )
    from mltrain.model.losses import LOSSES

    with pytest.raises(ConfigError) as info:
        LOSSES.get("TripletMarginLos")
    assert str(info.value).startswith("unknown loss 'TripletMarginLos' (did you mean "
                                      "TripletMarginLoss or TupletMarginLoss?); valid names: ")


def test_bad_args_become_config_error_naming_component():
    reg = _make()
    with pytest.raises(ConfigError) as info:
        reg.build({"name": "pair", "args": {"a": 1, "c": 3}})
    msg = str(info.value)
    assert "widget 'pair'" in msg and "'c'" in msg
    with pytest.raises(ConfigError, match="pair"):
        reg.build({"name": "pair"})  # missing required `a`


def test_bad_args_name_only_the_users_keys_and_what_the_component_takes():
    reg = Registry("widget")
    reg.register("sized", lambda size, scale=1.0, shift=0.0: (size, scale, shift))
    with pytest.raises(ConfigError) as info:
        reg.build({"name": "sized", "args": {"scael": 2}}, size=4)  # size: filled by the code
    msg = str(info.value)
    assert msg.startswith("widget 'sized': bad args ['scael']: ")
    assert msg.endswith("; it takes scale, shift")  # not `size`, which the code fills in


def test_duplicate_registration_is_refused():
    reg = _make()
    with pytest.raises(ValueError, match="'pair' is registered twice"):
        reg.register("pair", lambda: None)
    with pytest.raises(ValueError, match="registered twice"):

        @reg.register("triple")
        def again():
            return None

    # the original stays in place
    assert reg.build({"name": "pair", "args": {"a": 0}}) == (0, 10)
