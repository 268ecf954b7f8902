"""Property-based exactness: random small CNN DAGs x random occlusion settings."""

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from strategies import RandomNet, inplace_spec, occlusion_settings, random_cnns

import krypton_fx


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(net=random_cnns(), data=st.data(), seed=st.integers(0, 2**16))
def test_random_dag_incremental_equals_naive(net, data, seed):
    blocks, in_ch = net
    size, patch, stride, color = data.draw(occlusion_settings(in_ch))
    torch.manual_seed(seed)
    model = RandomNet(blocks, in_ch).eval()
    image = torch.randn(in_ch, *size)
    try:
        model(image[None])
    except RuntimeError:
        assume(False)  # the drawn layers shrink the map below one pixel
    ex = krypton_fx.compile(model, patch=patch, stride=stride, color=color, image_size=size,
                            channels=in_ch, output="logit")
    got = ex(image)
    want = krypton_fx.naive_occlusion(model, image, patch=patch, stride=stride, color=color,
                                      output="logit")
    assert got.label == want.label
    torch.testing.assert_close(got.heatmap, want.heatmap, atol=1e-4, rtol=1e-4)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(net=random_cnns(max_blocks=3), inplace=inplace_spec(), data=st.data(), seed=st.integers(0, 2**16))
def test_inplace_ops_anywhere_in_a_random_dag_equal_naive(net, inplace, data, seed):
    """An in-place statement (method, inplace=True function or module) at a random place."""
    blocks, in_ch = net
    blocks = list(blocks)
    blocks.insert(data.draw(st.integers(0, len(blocks)), label="position"), inplace)
    size, patch, stride, color = data.draw(occlusion_settings(in_ch))
    torch.manual_seed(seed)
    model = RandomNet(blocks, in_ch).eval()
    image = torch.randn(in_ch, *size)
    try:
        model(image[None].clone())
    except RuntimeError:
        assume(False)  # the drawn layers shrink the map below one pixel
    ex = krypton_fx.compile(model, patch=patch, stride=stride, color=color, image_size=size,
                            channels=in_ch, output="logit")
    got = ex(image)
    want = krypton_fx.naive_occlusion(model, image, patch=patch, stride=stride, color=color,
                                      output="logit")
    assert got.label == want.label
    torch.testing.assert_close(got.heatmap, want.heatmap, atol=1e-4, rtol=1e-4)
