"""Ember on Hugging Face models through a ds_config, under ZeRO 1/2/3 on 2 CPU ranks: the
exact parameters factored, the summary rank 0 prints, and every parameter equal to a
single-process Ember run on the full batch."""
import pytest

SPECS = ["gpt2:1", "gpt2:2", "gpt2:3", "llama:1", "llama:2", "llama:3"]
EXPECTED = {"gpt2": ["transformer.wte.weight"],
            "llama": ["lm_head.weight", "model.embed_tokens.weight"]}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests.conftest import torchrun
    return torchrun("ember_hf.py", 2, *SPECS, tmp_path=tmp_path_factory.mktemp("hf"),
                    timeout=600)


@pytest.mark.dist
@pytest.mark.parametrize("spec", SPECS)
def test_hf_model_through_ds_config_matches_single_process(results, spec):
    model, stage = spec.split(":")
    r0, r1 = results[0][spec], results[1][spec]
    assert r0["factored"] == r1["factored"] == EXPECTED[model]
    assert r0["moved"] > 1e-3                       # training really changed the weights
    for r in (r0, r1):
        assert r["table_err"] < 2e-5, r["table_err"]
        # lr 3e-3: a wrong lr, decay or betas moves the body by ~1e-3 in 3 steps
        assert r["body_abs"] < 5e-5, (r["worst"], r["body_abs"])
    # rank 0 says what Ember factors; rank 1 stays quiet
    for name in EXPECTED[model]:
        assert name in r0["summary"]
    assert f"ZeRO-{stage} over 2 ranks" in r0["summary"] and "-> AdamW" in r0["summary"]
    assert "wpe" not in r0["summary"] and r1["summary"] == ""
