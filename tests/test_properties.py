"""Property-based exactness: random small CNN DAGs x random occlusion settings."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import assert_random_dag_exact, inplace_spec, random_cnns


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(net=random_cnns(), data=st.data(), seed=st.integers(0, 2**16))
def test_random_dag_incremental_equals_naive(net, data, seed):
    blocks, in_ch = net
    assert_random_dag_exact(blocks, in_ch, data, seed)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(net=random_cnns(max_blocks=3), inplace=inplace_spec(), data=st.data(), seed=st.integers(0, 2**16))
def test_inplace_ops_anywhere_in_a_random_dag_equal_naive(net, inplace, data, seed):
    """An in-place statement (method, inplace=True function or module) at a random place."""
    blocks, in_ch = net
    blocks = list(blocks)
    blocks.insert(data.draw(st.integers(0, len(blocks)), label="position"), inplace)
    assert_random_dag_exact(blocks, in_ch, data, seed)
