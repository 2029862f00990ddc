"""SFT: prompt/response ids with and without a chat template, and loss weights exactly on response tokens."""

import numpy as np
import pytest
from conftest import WORDS_EN, make_sentences, train_byte_level_tokenizer
from oracles import next_token_targets

from clp_jax.data.sft import format_examples, response_bytes, sft_batch, truncate_example
from clp_jax.errors import ClpError

TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PAIRS = [("the house is small", "we walk to the river"), ("a child reads", "the old man sleeps near the window"),
         ("light rain falls today and the garden is green", "every morning")]


@pytest.fixture(scope="module")
def chat_tokenizer():
    tok = train_byte_level_tokenizer(make_sentences(WORDS_EN, 300, seed=7))
    tok.add_tokens(["<|user|>", "<|assistant|>", "<|end|>"], special_tokens=True)
    tok.chat_template = TEMPLATE
    return tok


def masked_text(tokenizer, batch, row):
    """Decode the tokens that the loss weights select as targets (weight at t means token t + 1 is learned)."""
    targets, _ = next_token_targets(batch["tokens"], batch["segment_ids"])
    return tokenizer.decode(targets[row][batch["loss_weights"][row] > 0].tolist())


def test_plain_format_is_prompt_newline_then_response_and_eos(en_tokenizer):
    prompt_ids, response_ids = format_examples(en_tokenizer, [("the house", "is green")])[0]
    assert en_tokenizer.decode(prompt_ids) == "the house\n"
    assert response_ids[-1] == en_tokenizer.eos_token_id
    assert en_tokenizer.decode(response_ids[:-1]) == "is green"


def test_chat_template_path_splits_the_rendered_conversation(chat_tokenizer):
    prompt_ids, response_ids = format_examples(chat_tokenizer, [("the house", "is green")])[0]
    assert chat_tokenizer.decode(prompt_ids) == "<|user|>the house<|end|>\n<|assistant|>"
    assert chat_tokenizer.decode(response_ids) == "is green<|end|>\n"
    full = chat_tokenizer.apply_chat_template([{"role": "user", "content": "the house"},
                                               {"role": "assistant", "content": "is green"}], tokenize=False)
    assert chat_tokenizer.decode(prompt_ids + response_ids) == full
    assert chat_tokenizer.convert_tokens_to_ids("<|assistant|>") == prompt_ids[-1]


@pytest.mark.parametrize("use_template", [False, True])
@pytest.mark.parametrize("pack", [False, True])
def test_loss_weights_select_exactly_the_response_tokens(en_tokenizer, chat_tokenizer, use_template, pack):
    tok = chat_tokenizer if use_template else en_tokenizer
    examples = format_examples(tok, PAIRS)
    batch = sft_batch(examples, seq_len=64, pad_id=0, pack=pack)
    assert set(batch) == {"tokens", "segment_ids", "positions", "loss_weights"}
    assert batch["tokens"].dtype == batch["segment_ids"].dtype == batch["positions"].dtype == np.int32
    assert batch["loss_weights"].dtype == np.float32
    assert batch["loss_weights"].sum() == sum(len(r) for _, r in examples)
    end = "<|end|>\n" if use_template else en_tokenizer.eos_token
    if not pack:
        assert batch["tokens"].shape == (3, 64)
        for row, (_, response) in enumerate(PAIRS):
            assert masked_text(tok, batch, row) == response + end
            n = len(examples[row][0]) + len(examples[row][1])
            np.testing.assert_array_equal(batch["positions"][row, :n], np.arange(n))
            assert np.all(batch["segment_ids"][row, :n] == 1) and np.all(batch["segment_ids"][row, n:] == 0)
    else:
        assert batch["tokens"].shape[0] < 3
        texts = [masked_text(tok, batch, row) for row in range(len(batch["tokens"]))]
        assert "".join(texts) == "".join(response + end for _, response in PAIRS)
        assert batch["segment_ids"].max() >= 2


def test_prompt_tokens_and_padding_get_no_weight(en_tokenizer):
    examples = format_examples(en_tokenizer, PAIRS)
    batch = sft_batch(examples, seq_len=40, pad_id=7)
    for row, (prompt, response) in enumerate(examples):
        weights = batch["loss_weights"][row]
        p, n = len(prompt), len(prompt) + len(response)
        assert np.all(weights[:p - 1] == 0) and np.all(weights[p - 1:n - 1] == 1) and np.all(weights[n - 1:] == 0)
        assert np.all(batch["tokens"][row, n:] == 7)


def test_long_examples_trim_the_prompt_from_the_left_first():
    prompt, response = list(range(100, 110)), list(range(200, 206))
    assert truncate_example(prompt, response, 16) == (prompt, response)
    assert truncate_example(prompt, response, 12) == (prompt[-6:], response)
    assert truncate_example(prompt, response, 5) == (prompt[-1:], response[:4])  # one prompt token stays
    assert truncate_example([], response, 4) == ([], response[:4])
    batch = sft_batch([(prompt, response)], seq_len=8, pad_id=0)
    np.testing.assert_array_equal(batch["tokens"][0], prompt[-2:] + response)
    assert batch["loss_weights"][0].tolist() == [0, 1, 1, 1, 1, 1, 1, 0]


def test_errors(en_tokenizer):
    with pytest.raises(ClpError, match="seq_len"):
        sft_batch([([1], [2])], seq_len=1, pad_id=0)
    broken = train_byte_level_tokenizer(make_sentences(WORDS_EN, 50))
    broken.chat_template = ("{% if add_generation_prompt %}ASSISTANT:{% endif %}"
                            "{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(ClpError, match="chat template"):
        format_examples(broken, [("q", "a")])[0]
    assert format_examples(en_tokenizer, []) == []
    assert sft_batch([], seq_len=8, pad_id=0)["tokens"].shape == (0, 8)


@pytest.mark.parametrize("use_template", [False, True])
@pytest.mark.parametrize("pack", [False, True])
def test_response_bytes_cover_exactly_the_response_text(en_tokenizer, chat_tokenizer, use_template, pack):
    """The bytes the weighted targets carry sum to the UTF-8 length of each response's text (with the template's
    end-of-turn text; EOS covers nothing), also for accents and emoji, and only kept tokens count when truncated."""
    tok = chat_tokenizer if use_template else en_tokenizer
    pairs = PAIRS + [("the garden", "Déjà vu, ça coûte 3 € 😀"), ("der fluss", "Über die Straße fällt Regen")]
    examples = format_examples(tok, pairs)
    nbytes = response_bytes(tok, pairs)
    assert [len(b) for b in nbytes] == [len(r) for _, r in examples] and all(b.dtype == np.int32 for b in nbytes)
    batch = sft_batch(examples, seq_len=64, pad_id=0, pack=pack, response_bytes=nbytes)
    assert batch["bytes"].dtype == np.int32 and batch["bytes"].shape == batch["tokens"].shape
    end = "<|end|>\n" if use_template else ""
    expected = sum(len((r + end).encode()) for _, r in pairs)
    assert (batch["loss_weights"][:, :-1] * batch["bytes"][:, 1:]).sum() == expected
    assert batch["bytes"].sum() == expected  # prompt tokens and padding carry none
    one = sft_batch(examples[1:2], seq_len=5, pad_id=0, response_bytes=nbytes[1:2])  # 1 prompt + 4 response tokens
    kept = tok.decode(examples[1][1][:4])
    assert "\ufffd" not in kept and kept.strip()
    assert (one["loss_weights"][:, :-1] * one["bytes"][:, 1:]).sum() == len(kept.encode())
    with pytest.raises(ValueError, match="response_bytes"):
        sft_batch(examples, seq_len=64, pad_id=0, response_bytes=nbytes[:-1])
