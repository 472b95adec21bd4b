"""Ember inside real DeepSpeed engines on 2 CPU ranks (gloo): every ZeRO stage, fp32 and bf16,
the ds_config route and the explicit (client optimizer) route, against a single-process
reference on the averaged gradients; checkpoint resume; config errors."""
import pytest

STAGES = ["0:fp32", "1:fp32", "2:fp32", "3:fp32", "2:fp32:client", "2:fp32:offload",
          "3:fp32:offload", "3:fp32:zeroinit", "0:bf16", "1:bf16", "2:bf16", "3:bf16", "1:bf16acc"]
WRAPPERS = {"0": "Ember", "1": "DeepSpeedZeroOptimizer", "2": "DeepSpeedZeroOptimizer",
            "3": "DeepSpeedZeroOptimizer_Stage3"}
STATE_BYTES = 4 * (300 + 48 + 1) + 4 * (257 + 48 + 1)  # two tables, O(V + D) each


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests.conftest import torchrun
    return torchrun("ember_zero.py", 2, *STAGES, tmp_path=tmp_path_factory.mktemp("zero"),
                    timeout=600)


@pytest.mark.dist
@pytest.mark.parametrize("spec", STAGES)
def test_zero_stage_matches_single_process_reference(results, spec):
    r0, r1 = results[0][spec], results[1][spec]
    stage, dtype = spec.split(":")[:2]
    if dtype == "fp32":
        assert r0["wrapper"] == WRAPPERS[stage]
    # bf16: the module's weights are rounded copies of the fp32 masters (3 significant digits)
    tol = 1e-5 if dtype == "fp32" else 3e-2
    for name, err in r0["errs"].items():
        assert err < tol, (spec, name, err)
    # state: fp32, O(V + D), replicated (identical on both ranks), 5 steps counted
    assert r0["state_dtype"] == "torch.float32" and r0["step"] == 5
    assert r0["state_bytes"] == STATE_BYTES and r0["n_tables"] == 2
    assert r0["r_sum"] == r1["r_sum"] and r0["c_sum"] == r1["c_sum"]
    if stage in ("1", "2", "3"):
        # the partitions really cut table rows, so the row/column reduction is exercised
        assert r0["cut_rows"] + r1["cut_rows"] > 0


def test_bf16_wrappers_are_the_expected_ones(results):
    assert results[0]["0:bf16"]["wrapper"] == "FP16_UnfusedOptimizer"
    assert results[0]["1:bf16acc"]["wrapper"] == "BF16_Optimizer"
    assert results[0]["3:bf16"]["wrapper"] == "DeepSpeedZeroOptimizer_Stage3"


@pytest.mark.parametrize("spec", ["1:fp32", "2:fp32", "3:fp32"])
def test_checkpoint_resume_gives_same_losses(results, spec):
    for r in results:
        res = r[spec]["resume"]
        assert res["tail"] == res["tail_resumed"]
        assert res["loaded_step"] == 3 and res["loaded_dtype"] == "torch.float32"


def test_ds_config_mistakes_are_one_line_errors_naming_the_fix(results):
    r = results[0]
    for label in ("bad_key_error", "typo_type", "lr_string", "lr_auto", "no_match"):
        assert r[label] and "\n" not in r[label], (label, r[label])
    assert "'beta_2'" in r["bad_key_error"] and "did you mean 'beta2'" in r["bad_key_error"]
    assert "valid keys" in r["bad_key_error"]
    assert "did you mean 'Ember'" in r["typo_type"]
    assert "must be a number" in r["lr_string"] and "without quotes" in r["lr_string"]
    assert "Hugging Face Trainer" in r["lr_auto"]
    assert "'*.nope' matches no parameter" in r["no_match"]


def test_type_is_case_insensitive_and_betas_are_the_body_betas(results):
    assert results[0]["lowercase_type"] == "Ember"
    assert results[0]["betas"] == [0.8, 0.9]


DEVICE_STAGES = ["1:fp32", "2:fp32", "3:fp32", "2:bf16"]


@pytest.mark.dist
def test_device_path_under_zero_matches_reference(tmp_path):
    """The accelerator's table step (EMBER_DS_DEVICE_STEP=1: stats, state and update
    kernels under the Triton interpreter, no host read) inside the same ZeRO engines: the
    partition pieces, the all-reduce and the resume give the single-process reference too."""
    from tests.conftest import torchrun
    res = torchrun("ember_zero.py", 2, *DEVICE_STAGES, tmp_path=tmp_path, timeout=600,
                   env={"EMBER_DS_DEVICE_STEP": "1", "TRITON_INTERPRET": "1"})
    for spec in DEVICE_STAGES:
        r0, r1 = res[0][spec], res[1][spec]
        tol = 1e-5 if "fp32" in spec else 3e-2
        assert all(err < tol for err in r0["errs"].values()), (spec, r0["errs"])
        assert r0["step"] == 5 and r0["cut_rows"] + r1["cut_rows"] > 0
        assert r0["r_sum"] == r1["r_sum"] and r0["c_sum"] == r1["c_sum"]
        if "resume" in r0:
            assert r0["resume"]["tail"] == r0["resume"]["tail_resumed"]
