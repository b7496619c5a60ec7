import pytest

from adakv_compile import AdaKVConfig, adakv_backend
from adakv_compile.config import layer_keep


@pytest.mark.parametrize("kwargs, field", [
    (dict(budget=16, window=32), "budget"),
    (dict(budget=64, compression_ratio=0.5), "budget"),
    (dict(budget=64.5), "budget"),
    (dict(compression_ratio=1.0), "compression_ratio"),
    (dict(compression_ratio=-0.1), "compression_ratio"),
    (dict(window=0), "window"),
    (dict(pooling="median"), "pooling"),
    (dict(kernel_size=4), "kernel_size"),
    (dict(alpha=1.5), "alpha"),
    (dict(gqa_reduce="sum"), "gqa_reduce"),
    (dict(allocation="greedy"), "allocation"),
    (dict(layer_schedule="cone"), "layer_schedule"),
    (dict(skip_layers=(-1,)), "skip_layers"),
    (dict(scorer="h2o"), "scorer"),
    (dict(decode_reserve=0), "decode_reserve"),
    (dict(safeguard="soft"), "safeguard"),
    (dict(prefill_compiler="untraced", prefill_chunk=4096), "prefill_chunk"),  # it would be silently ignored
    (dict(prefill_compiler="traced"), "prefill_compiler"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"AdaKVConfig\.{field}="):
        AdaKVConfig(**kwargs)


def test_config_is_frozen_and_normalises_skip_layers():
    c = AdaKVConfig(budget=64, skip_layers=[3, 1])
    assert c.skip_layers == (1, 3)
    with pytest.raises(Exception):
        c.budget = 3
    assert not AdaKVConfig().compresses and c.compresses


def test_backend_rejects_bad_arguments():
    with pytest.raises(ValueError, match="inner"):
        adakv_backend(AdaKVConfig(), inner="tvm")
    with pytest.raises(TypeError, match="AdaKVConfig"):
        adakv_backend({"budget": 3})
    with pytest.raises(ValueError, match="budget"):
        adakv_backend(budget=2)


def test_pyramid_budgets_average_to_the_flat_budget():
    c = AdaKVConfig(budget=96, window=16, layer_schedule="pyramid")
    L = 8
    keeps = [layer_keep(c, 5000, layer, L) for layer in range(L)]
    assert keeps == sorted(keeps, reverse=True)
    # PyramidKV: (max + min)/2 == base, up to the integer step rounding
    base = 96 - 16
    assert abs(sum(k - 16 for k in keeps) / L - base) <= (L - 1) / 2 + 1
