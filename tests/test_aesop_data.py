"""The Aesop loader, the character windows and the negative data of next-character FF.

Expected values are written out by hand or computed by plain Python loops, never taken from
the code under test.
"""

import pytest
import torch

from ff_kernels.paper.data import DataError
from ff_kernels.paper.data.aesop import (
    ALPHABET,
    AesopMissingError,
    AesopTextError,
    aesop_strings,
    chunk_strings,
    clean_text,
    decode,
    encode,
)
from ff_kernels.paper.data.char_negatives import generate_strings, sample_chars, teacher_forcing_negatives
from ff_kernels.paper.data.char_windows import one_hot_rows, prediction_windows, target_windows

from _paths import require_data

A = len(ALPHABET)


def test_alphabet_is_the_papers_30_symbols():
    assert A == 30 and set(ALPHABET) == set("abcdefghijklmnopqrstuvwxyz") | {" ", ",", ";", "."}


def test_clean_text_lower_cases_and_keeps_only_the_alphabet():
    raw = "\ufeffTHE FOX\nAND  the Grapes!\r\n\"I thought-those\tGrapes were ripe; 42 sour.\"  "
    assert clean_text(raw) == "the fox and the grapes i thoughtthose grapes were ripe; sour."


def test_encode_decode_round_trip_and_bad_character():
    codes = encode("az ,;.")
    assert codes.tolist() == [0, 25, 26, 27, 28, 29] and decode(codes) == "az ,;."
    with pytest.raises(ValueError, match="'!'"):
        encode("a!")


def test_strings_are_consecutive_chunks_of_the_cleaned_text(tmp_path):
    (tmp_path / "aesop.txt").write_text("\ufeffAb Cd.\nEf, GH; ij KL mn op qr\n", encoding="utf-8")
    # cleaned: "ab cd. ef, gh; ij kl mn op qr" (29 characters)
    strings = aesop_strings(tmp_path, num_strings=3, length=5)
    assert [decode(s) for s in strings] == ["ab cd", ". ef,", " gh; "]
    held_out = aesop_strings(tmp_path, num_strings=2, length=5, first=3)
    assert [decode(s) for s in held_out] == ["ij kl", " mn o"]
    assert strings.dtype == torch.int64 and strings.shape == (3, 5)


def test_text_file_and_environment_variable(tmp_path, monkeypatch):
    own = tmp_path / "own.txt"
    own.write_text("Hello world", encoding="utf-8")
    assert decode(aesop_strings(text_file=own, num_strings=1, length=11)[0]) == "hello world"
    (tmp_path / "aesop").mkdir()
    (tmp_path / "aesop" / "aesop.txt").write_text("Once upon", encoding="utf-8")
    monkeypatch.setenv("FF_KERNELS_DATA", str(tmp_path))
    assert decode(aesop_strings(num_strings=1, length=9)[0]) == "once upon"


def test_missing_short_and_undecodable_text(tmp_path, monkeypatch):
    monkeypatch.delenv("FF_KERNELS_DATA", raising=False)
    with pytest.raises(AesopMissingError, match="no Aesop text given"):
        aesop_strings()
    with pytest.raises(AesopMissingError, match="aesop.txt is not a file"):
        aesop_strings(tmp_path)
    (tmp_path / "aesop.txt").write_text("too short", encoding="utf-8")
    with pytest.raises(AesopTextError, match="has 9 characters after cleaning.*need 10"):
        aesop_strings(tmp_path, num_strings=2, length=5)
    (tmp_path / "aesop.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(AesopTextError, match="not UTF-8"):
        aesop_strings(tmp_path, num_strings=1, length=2)
    assert issubclass(AesopMissingError, DataError) and issubclass(AesopTextError, DataError)
    with pytest.raises(ValueError, match="num_strings must be an int >= 1"):
        chunk_strings("abc", 0, 1)


def test_the_real_fables():
    strings = aesop_strings(require_data("aesop"))
    assert strings.shape == (248, 100)
    assert decode(strings[0]).startswith("the fox and the grapes a hungry fox saw some fine bunches of grapes")
    assert 0 <= int(strings.min()) and int(strings.max()) < A


def random_strings(shape=(3, 15), seed=0):
    return torch.randint(0, A, shape, generator=torch.Generator().manual_seed(seed))


def test_windows_match_a_loop():
    strings, width, context = random_strings(), 4, 6
    before, ending = [], []
    for i in range(strings.shape[0]):
        for t in range(context, strings.shape[1]):
            before.append(strings[i, t - width:t].tolist())
            ending.append(strings[i, t - width + 1:t + 1].tolist())
    assert prediction_windows(strings, width, context).tolist() == before
    assert target_windows(strings, width, context).tolist() == ending


def test_windows_reject_bad_arguments():
    with pytest.raises(ValueError, match="width <= context < string length"):
        prediction_windows(random_strings(), 7, 6)
    with pytest.raises(TypeError, match="int64 tensor"):
        target_windows(random_strings().float(), 4, 6)


def test_one_hot_rows_match_a_loop():
    windows = random_strings((5, 4))
    expected = torch.zeros(5, 4 * A)
    for b in range(5):
        for k in range(4):
            expected[b, k * A + int(windows[b, k])] = 1.0
    assert torch.equal(one_hot_rows(windows, A), expected)
    with pytest.raises(ValueError, match=r"lie in \[0, 30\)"):
        one_hot_rows(torch.tensor([[30]]), A)


def test_sample_chars_follows_the_probabilities():
    probs = torch.tensor([[0.7, 0.3, 0.0]]).repeat(20_000, 1)
    chars = sample_chars(probs, torch.Generator().manual_seed(0))
    assert chars.shape == (20_000,) and chars.dtype == torch.int64
    assert int((chars == 2).sum()) == 0
    assert abs(float((chars == 0).float().mean()) - 0.7) < 0.02  # ~7 standard errors


def test_teacher_forcing_replaces_the_last_character_by_a_wrong_one():
    windows = random_strings((500, 10))
    probs = torch.rand(500, A)
    negatives = teacher_forcing_negatives(windows, probs, torch.Generator().manual_seed(1))
    assert negatives.shape == windows.shape and torch.equal(negatives[:, :-1], windows[:, :-1])
    assert bool((negatives[:, -1] != windows[:, -1]).all())
    truth = windows[:, -1].tolist()
    on_next = torch.nn.functional.one_hot((windows[:, -1] + 1) % A, A).float()  # all mass on a wrong character
    assert teacher_forcing_negatives(windows, on_next)[:, -1].tolist() == [(c + 1) % A for c in truth]
    on_truth = torch.nn.functional.one_hot(windows[:, -1], A).float()  # no mass on any wrong character
    assert bool((teacher_forcing_negatives(windows, on_truth)[:, -1] != windows[:, -1]).all())


def test_generated_strings_keep_the_context_and_follow_the_model():
    strings, width, context = random_strings((4, 20)), 3, 5
    seen = []

    def next_is_last_plus_one(windows):
        seen.append(windows.clone())
        return torch.nn.functional.one_hot((windows[:, -1] + 1) % A, A).float()

    generated = generate_strings(strings, width, context, next_is_last_plus_one)
    assert generated.shape == strings.shape and torch.equal(generated[:, :context], strings[:, :context])
    for i in range(4):
        for t in range(context, 20):
            assert int(generated[i, t]) == (int(generated[i, t - 1]) + 1) % A
    assert len(seen) == 20 - context
    for step, windows in enumerate(seen):
        t = context + step
        assert torch.equal(windows, generated[:, t - width:t])
    assert torch.equal(strings, random_strings((4, 20)))  # the input is not modified
