"""Preprocessing: exact round trip of the shipped text, bad-line reports, skip/rebuild, SFT/DPO masks."""

import json
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

from ironcore.data import preprocess
from ironcore.data.indexed import IndexedDataset, is_complete
from ironcore.data.tokenizer import GPT2_RANKS, GPT2Tokenizer, make_tokenizer

SHAKESPEARE = Path(__file__).resolve().parent.parent / "ironcore" / "assets" / "tinyshakespeare.txt"
EOD = 50256


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    """tiktoken's own GPT-2 encoding, built independently of ironcore's tokenizer class."""
    ranks = load_tiktoken_bpe(str(GPT2_RANKS))
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOD})


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("shk") / "shakespeare")
    assert preprocess.main(["--input", str(SHAKESPEARE), "--output-prefix", prefix, "--no-progress"]) == 0
    return prefix


def _blank_line_documents(text: str) -> list[str]:
    """The documents the tool should produce: blocks split at blank lines, each keeping its newlines."""
    blocks = text.rstrip("\n").split("\n\n")
    return [b + "\n\n" for b in blocks[:-1]] + [blocks[-1] + text[len(text.rstrip("\n")):]]


def test_shakespeare_round_trip_is_exact(shakespeare, tiktoken_gpt2):
    text = SHAKESPEARE.read_text(encoding="utf-8")
    data = IndexedDataset(shakespeare)
    expected_docs = _blank_line_documents(text)
    assert data.num_documents == len(expected_docs) == 7222
    assert data.dtype == np.uint16 and data.task == "pretrain" and data.vocab_size == 50257
    decoded = []
    for d in range(data.num_documents):
        doc = data.document(d)
        assert doc[-1] == EOD and not np.any(doc[:-1] == EOD), f"EOD misplaced in document {d}"
        decoded.append(tiktoken_gpt2.decode(doc[:-1].tolist()))
    assert decoded == expected_docs
    assert "".join(decoded) == text
    # The token count equals tiktoken's own count of the documents, plus one EOD per document.
    assert data.num_tokens == sum(len(tiktoken_gpt2.encode_ordinary(d)) for d in expected_docs) + len(expected_docs)
    assert data.num_tokens == 338028
    first = expected_docs[0]
    assert data.document(0)[:-1].tolist() == tiktoken_gpt2.encode_ordinary(first)


def test_two_workers_write_identical_files(shakespeare, tmp_path):
    prefix = str(tmp_path / "w2")
    assert preprocess.main(["--input", str(SHAKESPEARE), "--output-prefix", prefix, "--workers", "2",
                            "--chunk-size", "500", "--no-progress"]) == 0
    for ext in ("bin", "idx"):
        assert Path(f"{prefix}.{ext}").read_bytes() == Path(f"{shakespeare}.{ext}").read_bytes()
    assert not list(tmp_path.glob("*.tmp*")), "temporary files left behind"


def test_pool_streams_with_bounded_read_ahead():
    pulled = []

    def chunks():
        for i in range(100):
            pulled.append(i)
            yield [(i + 1, b"some text\n\n")], 11

    stream = preprocess._encoded_chunks(chunks(), 2, ("gpt2", "gpt2", "pretrain", ["text"], "text"))
    first, _ = next(stream)
    assert first.lengths.tolist() == [4] and first.bad == []  # "some", " text", "\n\n", EOD
    assert len(pulled) <= 4 * 2 + 1, f"read {len(pulled)} chunks ahead of the workers"
    assert sum(1 for _ in stream) == 99 and len(pulled) == 100
    stream.close()


def test_bad_lines_are_counted_and_reported(tmp_path, capsys):
    lines = [json.dumps({"text": "good one"}), "{not json", json.dumps({"text": "good two"}),
             json.dumps({"body": "no text key"}), json.dumps({"text": 5}), "", json.dumps(["a list"]),
             json.dumps({"text": "good three"})]
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(lines) + "\n")
    prefix = str(tmp_path / "c")
    assert preprocess.main(["--input", str(src), "--output-prefix", prefix, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "documents 3" in out and "bad lines 4" in out and "empty items skipped 1" in out
    assert "line 2: invalid JSON" in out
    assert "line 4: missing key 'text'" in out
    assert "line 5: key 'text' holds int, not a string" in out
    assert "line 7: expected a JSON object, got list" in out
    data = IndexedDataset(prefix)
    tok = GPT2Tokenizer()
    assert [tok.decode(data.document(d)[:-1]) for d in range(3)] == ["good one", "good two", "good three"]


def test_complete_output_is_skipped_incomplete_rebuilt(tmp_path, capsys):
    src = tmp_path / "t.txt"
    src.write_text("alpha beta\n\ngamma\ndelta\n")
    prefix = str(tmp_path / "t")
    args = ["--input", str(src), "--output-prefix", prefix, "--no-progress"]
    assert preprocess.main(args) == 0
    good = Path(prefix + ".bin").read_bytes()
    capsys.readouterr()
    assert preprocess.main(args) == 0
    assert "already complete; skipping" in capsys.readouterr().out
    Path(prefix + ".bin").write_bytes(good[:-2])  # a crash mid-write
    assert not is_complete(prefix)
    assert preprocess.main(args) == 0
    assert "rebuilding" in capsys.readouterr().out
    assert Path(prefix + ".bin").read_bytes() == good and is_complete(prefix)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_sft_and_dpo_store_the_loss_mask(tmp_path):
    tok = GPT2Tokenizer()
    rows = [{"prompt": "Q: two plus two?", "response": " A: four."}, {"prompt": "Hi", "response": " there friend"}]
    _write_jsonl(tmp_path / "sft.jsonl", rows)
    assert preprocess.main(["--task", "sft", "--input", str(tmp_path / "sft.jsonl"),
                            "--output-prefix", str(tmp_path / "sft"), "--no-progress"]) == 0
    sft = IndexedDataset(tmp_path / "sft")
    assert sft.task == "sft" and sft.num_documents == 2
    for d, r in enumerate(rows):
        p, a = tok.encode(r["prompt"]), tok.encode(r["response"])
        assert sft.document(d).tolist() == p + a + [EOD]
        assert sft.document_mask(d).tolist() == [0] * len(p) + [1] * (len(a) + 1)

    triples = [{"q": "Pick one:", "good": " yes", "bad": " no way"}]
    _write_jsonl(tmp_path / "dpo.jsonl", triples)
    assert preprocess.main(["--task", "dpo", "--input", str(tmp_path / "dpo.jsonl"), "--json-keys", "q", "good",
                            "bad", "--output-prefix", str(tmp_path / "dpo"), "--no-progress"]) == 0
    dpo = IndexedDataset(tmp_path / "dpo")
    p = tok.encode("Pick one:")
    assert dpo.task == "dpo" and dpo.num_documents == 2
    assert dpo.document(0).tolist() == p + tok.encode(" yes") + [EOD]
    assert dpo.document(1).tolist() == p + tok.encode(" no way") + [EOD]
    assert dpo.document_mask(1).tolist() == [0] * len(p) + [1] * (len(tok.encode(" no way")) + 1)


def test_wrong_key_count_and_text_input_for_sft_are_errors(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("x\n")
    assert preprocess.main(["--task", "sft", "--input", str(tmp_path / "a.txt"),
                            "--output-prefix", str(tmp_path / "a"), "--no-progress"]) == 2
    assert "needs a JSON-lines input" in capsys.readouterr().err
    _write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}])
    assert preprocess.main(["--task", "sft", "--json-keys", "text", "--input", str(tmp_path / "b.jsonl"),
                            "--output-prefix", str(tmp_path / "b"), "--no-progress"]) == 2
    assert "--json-keys: task sft reads 2 key(s)" in capsys.readouterr().err


def test_hf_tokenizer_from_a_local_folder(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    folder = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>").save_pretrained(str(folder))

    tok = make_tokenizer("hf", str(folder))
    assert tok.eod_id == 0 and tok.vocab_size == bpe.get_vocab_size()
    assert tok.decode(tok.encode("the lazy fox")) == "the lazy fox"
    _write_jsonl(tmp_path / "d.jsonl", [{"text": "the quick dog"}, {"text": "brown fox"}])
    assert preprocess.main(["--input", str(tmp_path / "d.jsonl"), "--output-prefix", str(tmp_path / "d"),
                            "--tokenizer-type", "hf", "--vocab-name-or-path", str(folder), "--no-progress"]) == 0
    data = IndexedDataset(tmp_path / "d")
    assert data.vocab_size == tok.vocab_size and data.dtype == np.uint16
    assert data.document(0).tolist() == tok.encode("the quick dog") + [0]
    with pytest.raises(ValueError, match="not a folder"):
        make_tokenizer("hf", str(tmp_path / "missing"))


def test_data_stats_reports_counts_and_top_tokens(shakespeare, capsys):
    from ironcore.data import stats

    assert stats.main([shakespeare + ".bin", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "documents  7,222" in out and "tokens     338,028" in out
    assert "doc length min 4  mean 46.8  median 28  max 860" in out
    top = [line.split() for line in out.splitlines()[-3:]]
    assert [t[0] for t in top] == ["198", "11", "25"] and top[0][1] == "25,558" and top[0][-1] == "'\\n'"
    assert stats.main([shakespeare + "-missing"]) == 2
    assert "file not found" in capsys.readouterr().err


def test_sft_chunk_of_only_bad_lines(tmp_path, capsys):
    (tmp_path / "s.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b", "response": " c"}\n')
    assert preprocess.main(["--task", "sft", "--input", str(tmp_path / "s.jsonl"), "--output-prefix",
                            str(tmp_path / "s"), "--chunk-size", "1", "--no-progress"]) == 0
    assert "line 1: missing key 'response'" in capsys.readouterr().out
    data = IndexedDataset(tmp_path / "s")
    assert data.num_documents == 1 and data.document_mask(0).tolist() == [0, 1, 1]
