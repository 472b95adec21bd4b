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


def train_args(tmp, tp: int) -> list:
    """launch/train.py's flags of the module's runs (the tiny Leviathan model, 2 steps)."""
    return ["--data", str(tmp / "tiny.txt"), "--cache-dir", str(tmp / "cache"), "--out",
            str(tmp / f"run{tp}"), "--steps", "2", "--deepspeed_config",
            str(ROOT / "ds_configs" / "ember_zero1_fp32.json"), "--vocab-size", "256",
            "--model", "hidden_size=32", "--model", "num_layers=1", "--model", "num_heads=2",
            "--model", "ffn_hidden_size=64", "--model", "seq_length=32", "--model",
            f"leviathan={LEV}", "--eval-samples", "4", "--ds",
            "train_micro_batch_size_per_gpu=4", "--no-progress", "--tp", str(tp), "--save",
            str(tmp / f"ckpt{tp}")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same 2-step Leviathan run at TP 1 (one process; saved at steps 1 and 2) and TP 2
    (two ranks; saved at step 2)."""
    from launch import data as D
    tmp = tmp_path_factory.mktemp("export")
    corpus = tmp / "tiny.txt"
    corpus.write_text("\n\n".join(list(D.iter_file_documents(D.DEFAULT_CORPUS))[:40]) + "\n")
    D.prepare_data([corpus], tmp / "cache", D.DataSettings(vocab_size=256), log=lambda m: None)
    out = {"tmp": tmp}
    for tp in (1, 2):
        launch = [sys.executable] if tp == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
        cmd = [*launch, str(ROOT / "launch" / "train.py"), *train_args(tmp, tp),
               *(["--save-interval", "1"] if tp == 1 else [])]
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
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "export.py"), "--checkpoint",
                           str(tmp_path / "empty"), "--out", str(tmp_path / "hf")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --checkpoint {tmp_path / 'empty'}: no intact checkpoint there (no step folder, "
        "no 'latest': not a checkpoint folder of launch/train.py)")
    assert not (tmp_path / "hf").exists()


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


# -- every reader chooses and verifies the checkpoint as a resume does (issue 22, point 3) ----

def _flip_record(f, seed: int) -> None:
    """Flip 4 bytes inside the largest record of a torch zip file (same size, bad CRC-32)."""
    import random
    import struct
    import zipfile
    with zipfile.ZipFile(f) as z:
        rec = max(z.infolist(), key=lambda i: i.file_size)
    b = bytearray(f.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", b, rec.header_offset + 26)
    at = (rec.header_offset + 30 + name_len + extra_len
          + random.Random(seed).randrange(rec.file_size - 4))
    b[at:at + 4] = bytes(x ^ 0xFF for x in b[at:at + 4])
    f.write_bytes(bytes(b))


def _damaged(ckpt, dest):
    """A copy of the TP 1 --save folder with every kind of unusable step: ``latest`` names
    step 3, deleted; step 4 is half-written (a copy of step 2 without its manifest and model
    file); step 2 has flipped bytes in its model and optimizer records; step 1 is intact."""
    import shutil
    shutil.copytree(ckpt, dest)
    step2 = dest / "step00000002"
    _flip_record(step2 / "mp_rank_00_model_states.pt", 1)
    _flip_record(step2 / "zero_pp_rank_0_mp_rank_00_optim_states.pt", 2)
    shutil.copytree(step2, dest / "step00000004")
    (dest / "step00000004" / "manifest.json").unlink()
    (dest / "step00000004" / "mp_rank_00_model_states.pt").unlink()
    (dest / "latest").write_text("step00000003")
    return dest


def _tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _notices(text: str, tool: str) -> list:
    prefix = f"[{tool}] warning: checkpoint "
    return [x[len(f"[{tool}] "):] for x in text.splitlines() if x.startswith(prefix)]


def test_every_reader_falls_back_as_the_resume_does(checkpoints, tmp_path, capsys):
    """train.py --resume and export, generate, evaluate, consolidate, reshard on the same
    damaged --save folder: the same three notices (the resume alone sets the damaged step
    aside), the same step used (1), and the readers change nothing in the folder."""
    from safetensors.torch import load_file

    from launch import evaluate, export, generate
    from launch.consolidate import load_consolidated
    from launch.reshard import read_universal
    tmp = checkpoints["tmp"]
    resumed = _damaged(checkpoints[1], tmp_path / "resumed")
    args = train_args(tmp, 1)
    args[args.index("--save") + 1] = str(resumed)
    args[args.index("--out") + 1] = str(tmp_path / "run")
    args[args.index("--steps") + 1] = "1"                  # nothing left to train
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *args,
                           "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    want = _notices(proc.stdout, "train")
    assert len(want) == 3 and all(w.endswith("falling back to step00000001") for w in want)
    assert "set aside as corrupt-step00000002, " in want[2]
    want = [w.replace("set aside as corrupt-step00000002, ", "") for w in want]
    assert want[0].startswith("warning: checkpoint step00000003 is named by ")
    assert "(deleted?)" in want[0]
    assert want[1].startswith("warning: checkpoint step00000004 is incomplete (no manifest.json")
    assert "step00000002/mp_rank_00_model_states.pt: checksum mismatch in record" in want[2]
    assert "step00000002/zero_pp_rank_0_mp_rank_00_optim_states.pt: checksum mismatch" in want[2]
    assert f"resumed from {resumed / 'step00000001'} at step 1" in proc.stdout

    bad = _damaged(checkpoints[1], tmp_path / "bad")
    before = _tree(bad)
    capsys.readouterr()

    def notices(tool):
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return [w.replace(str(bad), str(resumed)) for w in _notices(err, tool)]
    assert export.main(["--checkpoint", str(bad), "--out", str(tmp_path / "hf")]) == 0
    assert notices("export") == want
    intact = export.export(checkpoints[1] / "step00000001", tmp_path / "hf1")
    capsys.readouterr()
    got, ref = (load_file(d / "model.safetensors") for d in (tmp_path / "hf", intact))
    assert all(got[k].equal(ref[k]) for k in ref)           # step 1's weights, not step 2's
    assert generate.main(["--checkpoint", str(bad), "--prompt", "And", "--max-new-tokens", "3",
                          "--temperature", "0"]) == 0
    assert notices("generate") == want
    assert evaluate.main(["--checkpoint", str(bad), "--data", str(tmp / "tiny.txt"),
                          "--max-windows", "2"]) == 0
    assert notices("evaluate") == want
    _, state = load_consolidated(bad)
    assert state["step"] == 1 and notices("consolidate") == want
    assert read_universal(bad, optimizer=False).engine["global_steps"] == 1
    assert notices("reshard") == want
    assert _tree(bad) == before                             # readers rename nothing


@pytest.mark.parametrize("case", ["flipped bytes", "half-written"])
def test_readers_refuse_a_step_folder_that_is_not_intact_in_one_line(checkpoints, tmp_path,
                                                                     capsys, case):
    """A step folder named directly (no fall-back): each reader stops with the one line the
    resume's choice gives (Checkpointer.choose as train.py calls it), never a traceback."""
    import shutil

    from launch import checkpoint as C
    from launch import evaluate, export, generate
    from launch.consolidate import load_consolidated
    from launch.reshard import read_universal
    bad = tmp_path / "ckpt" / "step00000002"
    shutil.copytree(checkpoints[1] / "step00000002", bad)
    if case == "flipped bytes":
        _flip_record(bad / "mp_rank_00_model_states.pt", 3)
    else:
        (bad / "manifest.json").unlink()
        (bad / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    resume = tmp_path / "resume" / "step00000002"
    shutil.copytree(bad, resume)
    with pytest.raises(C.ConfigError) as e:                 # what train.py --resume DIR runs
        C.Checkpointer(resume, None, 0, 1, None).choose(resume, strict=False, required=True)
    want = str(e.value).replace(str(resume), str(bad))
    assert want.startswith(f"--resume {bad}: no intact checkpoint there (step00000002 is ")
    want = "error: --checkpoint " + want[len("--resume "):]
    capsys.readouterr()
    data = str(checkpoints["tmp"] / "tiny.txt")
    for tool, extra in ((export, ["--out", str(tmp_path / "hf")]), (generate, ["--prompt", "A"]),
                        (evaluate, ["--data", data])):
        code = tool.main(["--checkpoint", str(bad), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err == [want], (tool.__name__, err)
    for read in (load_consolidated, read_universal):
        with pytest.raises(C.ConfigError) as e:
            read(bad)
        assert f"error: {e.value}" == want
    assert not (tmp_path / "hf").exists()


def test_export_never_writes_into_the_checkpoint_or_over_other_files(checkpoints, tmp_path,
                                                                     capsys):
    """--out equal to or inside --checkpoint (or the --save folder of a named step) is refused
    before anything is written; a folder holding files needs --overwrite, which replaces an
    earlier export's files and keeps the others."""
    import shutil

    from launch import export
    save = tmp_path / "ckpt"
    shutil.copytree(checkpoints[1], save)
    before = _tree(save)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    (busy / "eod_token.txt").write_text("<|endoftext|>")          # from an earlier export
    capsys.readouterr()
    for ckpt, out, why in (
            (save, save, f"is the checkpoint folder {save}: export somewhere else"),
            (save, save / "hf", f"is inside the checkpoint folder {save}: export somewhere"),
            (save / "step00000002", save / "hf", f"is inside the checkpoint folder {save}:"),
            (save, busy, "already holds 2 file(s) (eod_token.txt, notes.txt); give "
                         "--overwrite")):
        assert export.main(["--checkpoint", str(ckpt), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --out {out} {why}"), err
    assert _tree(save) == before and not list(tmp_path.glob(".tmp-export-*"))
    assert export.main(["--checkpoint", str(save), "--out", str(busy), "--overwrite"]) == 0
    assert (busy / "notes.txt").read_text() == "mine" and not (busy / "eod_token.txt").exists()
    assert (busy / "model.safetensors").is_file() and (busy / "tokenizer.model").is_file()
    assert _tree(save) == before and not list(tmp_path.glob(".tmp-export-*"))
