"""One source of truth for defaults: ROS parameters, config/assistant.yaml and the CLI follow EngineConfig."""
from __future__ import annotations

import dataclasses
import pathlib

import pytest
import yaml

from infinipot_ros.engine import LIVE_FIELDS, EngineConfig
from infinipot_ros.ros.params import (BY_NAME, PARAMETERS, NodeSettings, declare_parameters, default, from_ros,
                                      is_live, owner, read_parameters, to_ros)
from infinipot_ros.tools.stream import _config_from_args, build_parser

REPO = pathlib.Path(__file__).resolve().parents[2]


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def test_every_config_field_is_a_parameter_and_back():
    fields = {f.name for f in dataclasses.fields(EngineConfig)} | {f.name for f in dataclasses.fields(NodeSettings)}
    mapped = [p.field for p in PARAMETERS]
    assert sorted(mapped) == sorted(set(mapped)), "two parameters map to one field"
    assert set(mapped) == fields, f"unmapped: {fields - set(mapped)}, unknown: {set(mapped) - fields}"


def test_config_file_states_the_defaults():
    doc = yaml.safe_load((REPO / "config" / "assistant.yaml").read_text())
    values = _flatten(doc["/**"]["ros__parameters"])
    assert set(values) == {p.name for p in PARAMETERS}
    for p in PARAMETERS:
        assert values[p.name] == default(p), f"config/assistant.yaml {p.name}: {values[p.name]!r} != {default(p)!r}"


def test_parameter_defaults_build_the_default_config():
    engine_kw = {p.field: from_ros(p, default(p)) for p in PARAMETERS if owner(p) == "engine"}
    assert EngineConfig(**engine_kw) == EngineConfig()
    node_kw = {p.field: from_ros(p, default(p)) for p in PARAMETERS if owner(p) == "node"}
    assert NodeSettings(**node_kw) == NodeSettings()


def test_live_parameters_are_exactly_the_live_fields():
    live = {p.field for p in PARAMETERS if is_live(p)}
    assert live == set(LIVE_FIELDS) | {"status_period_s"}
    assert {p.name for p in PARAMETERS if is_live(p)} == {
        "stream.frame_rate_hz", "ask.max_new_tokens", "ask.max_question_tokens", "ask.temperature",
        "ask.timeout_s", "ask.max_pending", "ask.max_ingest_gap_s", "status.period_s"}


def test_pool_kernels_round_trip_and_refuse_bad_values():
    p = next(p for p in PARAMETERS if p.field == "pool_kernels")
    kernels = EngineConfig().pool_kernels
    assert from_ros(p, to_ros(p, kernels)) == kernels and len(to_ros(p, kernels)) == 12
    assert from_ros(p, []) == ()
    with pytest.raises(ValueError, match="triples"):
        from_ros(p, [3, 3])


def test_cli_defaults_are_the_engine_defaults():
    args = build_parser().parse_args(["--video", "x.avi"])
    assert _config_from_args(args) == EngineConfig()


@pytest.mark.parametrize("name,field", [("model.allow_pickle", "allow_pickle"),
                                        ("model.allow_download", "allow_download")])
def test_safe_loading_parameters_default_false_and_read_only(name, field):
    p = BY_NAME[name]
    assert (p.field, owner(p), is_live(p)) == (field, "engine", False)
    assert default(p) is False and getattr(EngineConfig(), field) is False
    assert EngineConfig(**{field: True}).adapter_kwargs()[field] is True


def test_safe_loading_parameters_on_a_node():
    """Declared on a real rclpy node: bool, read-only, default false; an override reaches EngineConfig."""
    import rclpy
    from rcl_interfaces.msg import ParameterType
    from rclpy.node import Node
    from rclpy.parameter import Parameter

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = Node("infinipot_params_test", context=context,
                    parameter_overrides=[Parameter("model.allow_pickle", value=True)])
        declare_parameters(node)
        for name in ("model.allow_pickle", "model.allow_download"):
            desc = node.describe_parameter(name)
            assert desc.type == ParameterType.PARAMETER_BOOL and desc.read_only, name
        assert node.get_parameter("model.allow_download").value is False
        config, _ = read_parameters(node)
        assert (config.allow_pickle, config.allow_download) == (True, False)
        assert config.adapter_kwargs()["allow_pickle"] is True
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
