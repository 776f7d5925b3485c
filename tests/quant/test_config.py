import pytest

import qla_kernels as qk
from qla_kernels.quant import QuantConfig


@pytest.mark.parametrize("config", [qk.W8A8(), qk.W4A4(), qk.W4A8(), qk.W4A8(group_size=128), qk.W4A16(), qk.W4A16(group_size=None)])
def test_round_trip_through_dict(config):
    assert QuantConfig.from_dict(config.to_dict()) == config


def test_formats_and_bits():
    assert (qk.W8A8().weight_format, qk.W8A8().act_bits) == ("int8", 8)
    assert (qk.W4A4().weight_format, qk.W4A4().act_bits, qk.W4A4().weight_bits) == ("int8", 4, 4)
    assert qk.W4A8().weight_format == "int4"
    assert qk.W4A8(group_size=64).weight_format == "int4_int8_groups"
    assert (qk.W4A16().weight_format, qk.W4A16().act_bits, qk.W4A16().group_size) == ("uint4_asym_groups", None, 128)


@pytest.mark.parametrize("make", [qk.W4A8, qk.W4A16])
@pytest.mark.parametrize("bad", [0, -16, 24, 100, 1.5, "128", True])
def test_bad_group_size_names_the_field(make, bad):
    with pytest.raises(ValueError, match="group_size"):
        make(group_size=bad)


def test_configs_are_frozen():
    with pytest.raises(Exception):
        qk.W4A16().group_size = 64


def test_in_features_checks():
    qk.W4A16(group_size=64).check_in_features(192)
    with pytest.raises(ValueError, match="in_features=100 is not a multiple of W4A16.group_size=64"):
        qk.W4A16(group_size=64).check_in_features(100)
    with pytest.raises(ValueError, match="even"):
        qk.W4A8().check_in_features(33)
    qk.W8A8().check_in_features(33)


def test_unknown_config_name():
    with pytest.raises(ValueError, match="unknown quantization config"):
        QuantConfig.from_dict({"name": "W3A3"})
