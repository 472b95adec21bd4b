"""launch/consolidate.py and launch/export.py: a TP = 2 checkpoint joins to the TP = 1 run's
weights, and its Hugging Face export (LlamaForCausalLM from safetensors, loaded offline) gives
the project model's logits (Leviathan generator materialised into the table)."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, free_port

LEV = '{"seed_dim":16,"modes":8,"heads":2,"knots":4}'


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same 2-step Leviathan run at TP 1 (one process) and TP 2 (two ranks)."""
    from launch import data as D
    tmp = tmp_path_factory.mktemp("export")
    corpus = tmp / "tiny.txt"
    corpus.write_text("\n\n".join(list(D.iter_file_documents(D.DEFAULT_CORPUS))[:40]) + "\n")
    D.prepare_data([corpus], tmp / "cache", D.DataSettings(vocab_size=256), log=lambda m: None)
    out = {}
    for tp in (1, 2):
        launch = [sys.executable] if tp == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
        cmd = [*launch, str(ROOT / "launch" / "train.py"), "--data", str(corpus),
               "--cache-dir", str(tmp / "cache"), "--out", str(tmp / f"run{tp}"), "--steps", "2",
               "--deepspeed_config", str(ROOT / "ds_configs" / "ember_zero1_fp32.json"),
               "--vocab-size", "256", "--model", "hidden_size=32", "--model", "num_layers=1",
               "--model", "num_heads=2", "--model", "ffn_hidden_size=64", "--model",
               "seq_length=32", "--model", f"leviathan={LEV}", "--eval-samples", "4",
               "--ds", "train_micro_batch_size_per_gpu=4", "--no-progress", "--tp", str(tp),
               "--save", str(tmp / f"ckpt{tp}")]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        out[tp] = tmp / f"ckpt{tp}"
    return out


def test_tp2_checkpoint_joins_to_the_tp1_weights(checkpoints):
    from launch.consolidate import load_consolidated
    one, state1 = load_consolidated(checkpoints[1])
    two, state2 = load_consolidated(checkpoints[2])
    assert (state1["tp"], state2["tp"], state2["step"]) == (1, 2, 2)
    fresh = dict(type(one)(one.cfg).named_parameters())
    params2 = dict(two.named_parameters())
    for name, p in one.named_parameters():
        assert (p - params2[name]).abs().max() < 1e-5, name
        if name.startswith(("layers.", "lm_head")):
            assert (p - fresh[name]).abs().max() > 1e-4, name    # trained, not initial


def test_hugging_face_export_gives_the_same_logits(checkpoints, tmp_path):
    import transformers

    from launch.consolidate import load_consolidated
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "export.py"), "--checkpoint",
                           str(checkpoints[2]), "--out", str(tmp_path / "hf")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    model, _ = load_consolidated(checkpoints[2])
    assert hf.config.num_key_value_heads == model.cfg.num_query_groups
    ids = torch.randint(0, model.cfg.vocab_size, (2, 32))
    with torch.no_grad():
        ours = model(ids)[..., :model.cfg.vocab_size]
        theirs = hf(ids).logits
    assert ours.abs().max() > 0.05
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_export_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "export.py"), "--checkpoint",
                           str(tmp_path), "--out", str(tmp_path / "hf")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path}: not a checkpoint")


def test_generate_from_a_checkpoint_and_its_export(checkpoints, tmp_path, monkeypatch):
    """Greedy decoding from the checkpoint (tokenizer found in its --save folder) and from its
    export give the same text; sampling is seeded. The export's tokenizer also loads with
    AutoTokenizer and gives the SentencePiece ids (tests/test_hf_tokenizer.py tests more)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from launch.export import export
    from launch.generate import generate
    out = export(checkpoints[2], tmp_path / "hf")
    assert (out / "tokenizer.model").is_file()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    text = "In the  beginning God ﬁnally said: «Ｌｅｔ there be light» 日本 🙂\tcafé\n"
    assert hf_tok(text)["input_ids"] == sp.encode(text) and sp.unk_id() in sp.encode(text)
    assert hf_tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert hf_tok.model_max_length == 32 and hf_tok.eos_token_id == sp.eos_id()
    greedy = [generate(p, "In the beginning", max_new_tokens=12, temperature=0)
              for p in (checkpoints[2], out)]
    assert greedy[0] == greedy[1] and greedy[0].startswith("In the beginning")
    assert len(greedy[0]) > len("In the beginning")
    sampled = [generate(out, "And", max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9,
                        seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]


def test_tokenizer_given_as_a_folder(checkpoints, tmp_path, capsys):
    """--tokenizer may name a folder (an earlier export): its tokenizer.model is taken; a
    folder without one, or a path that does not exist, is a one-line error, not a traceback."""
    from launch.export import export, main
    first = export(checkpoints[1], tmp_path / "hf")
    second = export(checkpoints[1], tmp_path / "hf2", tokenizer=first)
    assert (second / "tokenizer.model").read_bytes() == (first / "tokenizer.model").read_bytes()
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    for bad, why in ((tmp_path / "empty", "the folder holds no tokenizer.model or tokenizer.json"),
                     (tmp_path / "missing", "no such file or folder")):
        assert main(["--checkpoint", str(checkpoints[1]), "--out", str(tmp_path / "hf3"),
                     "--tokenizer", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0] == f"error: --tokenizer {bad}: {why}", err
        assert not (tmp_path / "hf3").exists()  # refused before anything was written


def test_evaluate_scores_every_next_token_of_the_files(checkpoints, tmp_path):
    """launch/evaluate.py's loss equals the project model's mean token loss over the same
    windows, computed here from the tokenizer and GPT directly."""
    import subprocess as sp
    import json as js

    from launch.consolidate import find_tokenizer, load_consolidated
    from launch.tokenization import load_cached
    docs = ["In the beginning God created the heaven and the earth.",
            "And the earth was without form, and void; and darkness was upon the face of the deep."
            " And the Spirit of God moved upon the face of the waters."]
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(js.dumps({"text": d}) + "\n" for d in docs))
    proc = sp.run([sys.executable, str(ROOT / "launch" / "evaluate.py"), "--checkpoint",
                   str(checkpoints[2]), "--data", str(data), "--json", str(tmp_path / "r.json")],
                  cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = js.loads((tmp_path / "r.json").read_text())
    assert "[evaluate] loss" in proc.stdout

    tok_file = find_tokenizer(checkpoints[2])
    tok = load_cached(tok_file.parent, tok_file.name)
    ids = [i for d in docs for i in tok.encode_batch([d])[0] + [tok.eod_id]]
    model, _ = load_consolidated(checkpoints[2])
    seq = model.cfg.seq_length
    losses = []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, seq):
            w = torch.tensor([ids[start:start + seq + 1]])
            losses.append(model(w[:, :-1], labels=w[:, 1:]).reshape(-1))
    want = torch.cat(losses)
    assert got["tokens"] == want.numel() == len(ids) - 1 and got["windows"] == len(losses) > 1
    assert abs(got["loss"] - want.mean().item()) < 1e-5
