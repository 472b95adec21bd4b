"""Ember on vocab-parallel tables (megatron-core parallel_state, gloo): TP = 2 alone and
TP = 2 x DP = 2 under DeepSpeed ZeRO 1/2/3 equal the TP = 1 single-process run."""
import pytest


def check(results, world, tp=2):
    assert len(results) == world
    for r in results:
        for name, err in r["errs"].items():
            assert err < 1e-5, (name, err, r)
        assert r["moved"] > 1e-3                 # the tables were really trained
        assert r["r_len"] == 96 // tp            # r holds this shard's rows only
        assert r["global_rows"] == [96, 96]      # V is the global row count
        assert r["n_tables"] == 2
    # c is the global column statistic: identical on every rank
    assert len({r["c_sum"] for r in results}) == 1


@pytest.mark.dist
def test_tp2_plain(run_dist):
    check([r["plain"] for r in run_dist("ember_tp.py", 2, "plain")], 2)


@pytest.fixture(scope="module")
def zero_results(tmp_path_factory):
    from tests.conftest import torchrun
    return torchrun("ember_tp.py", 4, "zero1", "zero2", "zero3",
                    tmp_path=tmp_path_factory.mktemp("tp_zero"), timeout=600)


@pytest.mark.dist
@pytest.mark.parametrize("mode", ["zero1", "zero2", "zero3"])
def test_tp2_dp2_zero(zero_results, mode):
    check([r[mode] for r in zero_results], 4)


@pytest.mark.dist
def test_tp2_device_path(run_dist):
    """The accelerator's table step (stats, state, update kernels under the interpreter, no
    host read) on vocab-parallel tables: the column sums' all-reduce over the row group."""
    env = {"EMBER_DS_DEVICE_STEP": "1", "TRITON_INTERPRET": "1"}
    check([r["plain"] for r in run_dist("ember_tp.py", 2, "plain", env=env)], 2)
