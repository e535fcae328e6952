"""`convert_checkpoint.py --to hf` writes folders that Hugging Face tools use as they are: the
tokenizer encodes like IronCore's, the special ids are the tokenizer's, and
``pipeline("text-generation")`` continues a prompt with the tokens ``tools/generate.py`` picks."""

from __future__ import annotations

import json

import pytest

from ironcore.checkpoint.hf import convert_hf_folder
from ironcore.data.tokenizer import GPT2Tokenizer
from tests.hf_helpers import REPO, preset, random_hf_model
from tests.train_helpers import load, write_config

transformers = pytest.importorskip("transformers")

VOCAB = 50257
TEXT = "First Citizen:\n  Before we proceed any further, hear me speak.\t12345 it's we'll héllo 日本語  "


@pytest.mark.parametrize("arch", ["tiny", "tiny-llama"])
def test_export_is_usable_by_hf_tokenizer_and_pipeline(tmp_path, arch, capsys):
    from tools.convert_checkpoint import main as convert
    from ironcore.inference.cli import main as generate

    model_cfg = preset(arch)
    model_cfg.max_seq_len = 32
    random_hf_model(model_cfg, VOCAB, seed=5).save_pretrained(tmp_path / "hf")
    cfg = load(write_config(tmp_path, "run", model=arch))
    convert_hf_folder(str(tmp_path / "hf"), cfg, str(tmp_path / "ckpt"), tp_size=2)  # a TP=2 checkpoint
    assert convert(["--from", "ironcore", "--to", "hf", "--input", str(tmp_path / "ckpt"),
                    "--output", str(tmp_path / "out")]) == 0

    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer(TEXT, add_special_tokens=False)["input_ids"] == GPT2Tokenizer().encode(TEXT)
    for name in ("config.json", "generation_config.json"):
        saved = json.loads((tmp_path / "out" / name).read_text())
        assert (saved["bos_token_id"], saved["eos_token_id"]) == (50256, 50256), name

    prompt = "Before we proceed"
    capsys.readouterr()
    assert generate(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", prompt, "--temperature", "0",
                     "--max-new-tokens", "8", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)["results"][0]
    assert ours["prompt_ids"] == GPT2Tokenizer().encode(prompt) and len(ours["ids"]) == 8
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "out"))
    theirs = pipe(prompt, do_sample=False, max_new_tokens=8, return_tensors=True)[0]["generated_token_ids"]
    assert list(theirs) == ours["prompt_ids"] + ours["ids"]


class _OpensAFile:
    """Unpickling this object creates ``marker``: it stands in for a pickle that runs code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_export_refuses_a_malicious_model_file_with_a_one_line_error(tmp_path, capsys):
    """A model file the manifest vouches for but that runs code when unpickled is never executed by
    ``--to hf``: the tool exits 1 with one line naming the file and none of its contents."""
    import hashlib

    import torch

    from ironcore.checkpoint import io as ckpt_io
    from ironcore.checkpoint.errors import CheckpointError
    from ironcore.checkpoint.hf import export_hf_folder
    from tools.convert_checkpoint import main as convert

    random_hf_model(preset("tiny-llama"), 1000, seed=1).save_pretrained(tmp_path / "hf")
    folder = convert_hf_folder(str(tmp_path / "hf"), load(write_config(tmp_path, "run", model="tiny-llama")),
                               str(tmp_path / "ckpt"))
    marker, name = tmp_path / "executed", ckpt_io.model_file(0, 0)
    torch.save({"payload": _OpensAFile(str(marker))}, folder / name)
    data = (folder / name).read_bytes()
    manifest = json.loads((folder / ckpt_io.MANIFEST).read_text())
    manifest["files"][name] = {**manifest["files"][name], "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / ckpt_io.MANIFEST).write_text(json.dumps(manifest))

    with pytest.raises(CheckpointError, match="weights_only=True refused it") as error:
        export_hf_folder(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    assert str(folder / name) in str(error.value) and "\n" not in str(error.value)
    assert "payload" not in str(error.value) and "_OpensAFile" not in str(error.value)
    capsys.readouterr()
    assert convert(["--from", "ironcore", "--to", "hf", "--input", str(tmp_path / "ckpt"),
                    "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert str(folder / name) in err and err.count("\n") == 1
    assert not marker.exists()
