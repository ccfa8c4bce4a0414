"""Text side of data.py: the BPE trainer, its tiktoken encoding, save/load/cache, and the Llama-3 loader."""
import base64
import collections
import random
import unicodedata

import pytest
import regex  # tiktoken's own dependency; the reference splitter for LLAMA3_PAT here, never in data.py

import data

CORPUS = [
    "The lungs are clear. No pleural effusion. A 3.5 mm nodule in the right upper lobe.",
    "Mild cardiomegaly; coronary artery wall calcification.\n\nNo lymphadenopathy!",
    "Is there a pleural effusion? Yes. Where is the nodule? In the left lower lobe.",
    "It's what they've said, we'll see: I'm sure you'd agree they're right.",
    "Türkçe: İstanbul, ılık, Şişli, şeker, Ğ, ğ — naïve café, 東京, 🎉🫁 emoji.",
    "tabs\tand   runs of     spaces\r\nand CRLF\r\n\r\n  trailing   ",
] * 3

ROUND_TRIP = [
    "", " ", "\n", "   \t \n\n  ", "İıŞşĞğ ÖöÜüÇç", "🎉🫁👩‍⚕️🏳️‍🌈 x🎉y", "東京の肺 CT", "a" * 200 + " " * 50,
    "it's IT'S It'S 's IT'SELF 'LLAMA we'Ve", "12345678 3.14159", "e\u0301 combining", "<|pad|> looks special but is text",
    "\x00\x01\x1c\x1f\x7f\u00a0\u2028\u3000 odd whitespace", "A 3.5 mm nodule.\r\n\r\nNext line   ",
]


@pytest.fixture(scope="module")
def enc():
    return data.train_bpe(CORPUS, 256 + 120 + len(data.SPECIAL_TOKENS))


def naive_train(texts, vocab_size):
    """The slow, obviously-correct twin: re-count every pair of every chunk occurrence before each merge."""
    words = [list(c.encode()) for t in texts for c in data._pretokenizer().findall(t)]
    vocab = [bytes([b]) for b in range(256)]
    ranks = {b: i for i, b in enumerate(vocab)}
    while len(ranks) < vocab_size - len(data.SPECIAL_TOKENS):
        pairs = collections.Counter(p for w in words for p in zip(w, w[1:]))
        if not pairs:
            break
        p = min(pairs, key=lambda q: (-pairs[q], q))
        merged = vocab[p[0]] + vocab[p[1]]
        if merged not in ranks:
            ranks[merged] = len(vocab)
            vocab.append(merged)
        new, out = ranks[merged], []
        for w in words:
            o, j = [], 0
            while j < len(w):
                if w[j:j + 2] == list(p):
                    o.append(new)
                    j += 2
                else:
                    o.append(w[j])
                    j += 1
            out.append(o)
        words = out
    return ranks


def python_encode(ranks, text):
    """tiktoken's rule written out: split with our pattern, then in each chunk merge the adjacent pair whose
    concatenation has the lowest rank, until none is a token."""
    ids = []
    for chunk in data._pretokenizer().findall(text):
        parts = [bytes([b]) for b in chunk.encode()]
        while len(parts) > 1:
            r, i = min((ranks.get(parts[i] + parts[i + 1], float("inf")), i) for i in range(len(parts) - 1))
            if r == float("inf"):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


def test_merge_order_by_hand():
    # "aaab": (a,a) twice -> "aa"; then (aa,a) and (a,b) tie at 1 -> the smaller ids (97, 98) -> "ab"; then "aaab"
    enc = data.train_bpe(["aaab"], 256 + 3 + len(data.SPECIAL_TOKENS))
    new = sorted((r, t) for t, r in enc._mergeable_ranks.items() if r >= 256)
    assert new == [(256, b"aa"), (257, b"ab"), (258, b"aaab")]
    assert enc.encode("aaab") == [258]
    # frequency decides: "ab" occurs 3 times across chunks "ab", " ab", " ab"; " a" twice
    enc = data.train_bpe(["ab ab ab cd"], 256 + 2 + len(data.SPECIAL_TOKENS))
    assert sorted(t for t, r in enc._mergeable_ranks.items() if r >= 256) == [b" ab", b"ab"]
    assert enc._mergeable_ranks[b"ab"] == 256


def test_incremental_trainer_matches_naive_twin(enc):
    assert enc._mergeable_ranks == naive_train(CORPUS, enc.n_vocab)


def test_split_and_encode_agree_with_tiktoken(enc):
    # tiktoken splits in Rust with LLAMA3_PAT; our `re` translation must cut the same chunks or the ids differ
    for text in ROUND_TRIP + CORPUS:
        assert enc.encode(text, disallowed_special=()) == python_encode(enc._mergeable_ranks, text), text
    assert "".join(data._pretokenizer().findall("a  b\n\n c   ")) == "a  b\n\n c   "
    assert data._pretokenizer().findall("a   b") == ["a", "  ", " b"]  # \s+(?!\S) leaves a space to the word


def test_pretokenizer_matches_regex_module():
    # every code point assigned in Python's Unicode tables, shuffled among spaces, digits, newlines, contractions
    chars = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    pieces = chars + list(" \t\n\r'0123456789") * 3000 + ["'s", "'LL", "'Ve", "\r\n", "   ", "\u3000\n"] * 1000
    random.Random(0).shuffle(pieces)
    text = "".join(pieces)
    assert data._pretokenizer().findall(text) == regex.findall(data.LLAMA3_PAT, text)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(enc, text):
    ids = enc.encode(text, disallowed_special=())
    assert enc.decode(ids) == text
    assert all(0 <= i < enc.n_vocab - len(data.SPECIAL_TOKENS) for i in ids)


def test_vocab_and_special_ids(enc):
    n = len(enc._mergeable_ranks)
    assert n == 256 + 120 and enc.n_vocab == n + 4
    assert sorted(enc._mergeable_ranks.values()) == list(range(n))  # dense ranks
    for i, tok in enumerate(data.SPECIAL_TOKENS):
        assert enc.encode(tok, allowed_special="all") == [n + i]
        assert enc.decode([n + i]) == tok
    # frequent corpus words became single tokens
    assert len(enc.encode(" pleural")) == 1 and len(enc.encode(" nodule")) == 1


def test_save_load_equal_and_cache(enc, tmp_path):
    path = tmp_path / "bpe.tiktoken"
    data.save_bpe(enc, path)
    line = path.read_text().splitlines()[300]
    tok, rank = line.split()
    assert enc._mergeable_ranks[base64.b64decode(tok)] == int(rank) == 300
    back = data.load_bpe(path)
    assert back._mergeable_ranks == enc._mergeable_ranks and back._special_tokens == enc._special_tokens
    assert back.encode(CORPUS[4]) == enc.encode(CORPUS[4])
    bad = tmp_path / "bad.model"
    bad.write_text("not base64!! x\n")
    with pytest.raises(ValueError, match="bad.model:1"):
        data.load_bpe(bad)


def write_fake_llama(path, n_ranks):
    extra = [b"he", b"ll", b"hell", b"hello"] + [b"\xff" + i.to_bytes(3, "big") for i in range(n_ranks - 260)]
    toks = [bytes([b]) for b in range(256)] + extra[:n_ranks - 256]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(toks)))


def test_llama3_small_fake(tmp_path):
    path = tmp_path / "tokenizer.model"
    write_fake_llama(path, 260)
    enc = data.load_llama3_tokenizer(path)
    assert enc.encode("hello") == [259]  # he, ll, hell, hello: the merges apply
    assert enc.encode("<|begin_of_text|>", allowed_special="all") == [260]  # offsets from num_base_tokens
    assert enc.encode("<|eot_id|>", allowed_special="all") == [269]
    assert enc.n_vocab == 260 + 256
    assert enc.decode(enc.encode("İıŞşĞğ 🎉 hello")) == "İıŞşĞğ 🎉 hello"


def test_llama3_real_size_ids(tmp_path):
    # a file with the real file's 128000 ranks gets Meta's ids
    path = tmp_path / "tokenizer.model"
    write_fake_llama(path, 128000)
    enc = data.load_llama3_tokenizer(path)
    ids = {t: enc.encode(t, allowed_special="all")[0] for t in enc.special_tokens_set}
    expect = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|reserved_special_token_0|>": 128002,
              "<|reserved_special_token_1|>": 128003, "<|finetune_right_pad_id|>": 128004,
              "<|reserved_special_token_2|>": 128005, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
              "<|eom_id|>": 128008, "<|eot_id|>": 128009, "<|python_tag|>": 128010,
              "<|reserved_special_token_3|>": 128011, "<|reserved_special_token_247|>": 128255}
    assert {t: ids[t] for t in expect} == expect
    assert len(ids) == 256 and sorted(ids.values()) == list(range(128000, 128256)) and enc.n_vocab == 128256
