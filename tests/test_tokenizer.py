"""Tokenizer: IDs equal OpenAI CLIP's and a Rust BPE's on every demo caption, layout, truncation, pickling."""

import pickle
import string

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest

from roclip_jax.bench import tokenizer as bench_tokenizer
from roclip_jax.data import demo
from roclip_jax.data import tokenizer as tokenizer_lib

SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.get_tokenizer(77)


@pytest.fixture(scope="module")
def hf_tokenizer():
  """transformers' CLIPTokenizer (Rust BPE) built from the same merges file.

  An independent BPE implementation: agreement checks our merge loop, byte
  mapping and vocabulary order, not just a few memorised IDs.
  """
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top

  merges = tokenizer_lib.load_merges()
  vocab = tokenizer_lib.build_vocab(merges)
  return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)


@pytest.fixture(scope="module")
def fast_tokenizer():
  """The benchmark's tokenizer on `CLIPTokenizerFast`: an independent BPE and pre-tokenizer (Rust)."""
  return bench_tokenizer.FastTokenizer(77)


# Beyond the demo's vocabulary: what OpenAI's cleaning and pre-tokenisation must get right.
HARD_CAPTIONS = [
    "",
    "   ",
    "\t\n  A  photo\n\nof   a CAT\t",
    "naïve café résumé Ångström façade",
    "<b>cafe&#769;</b> <i>A&#778;ngstr&ouml;m</i>",  # Stays decomposed: no NFC after unescaping.
    "cafÃ© mojibake",  # ftfy repairs it.
    "emoji 🙂👍🏽 family 👩‍👩‍👧 flag 🇫🇷",
    "fish &amp;amp; chips &lt;3 &quot;quoted&quot; &#39;single&#39; &copy; &nbsp;x",
    "it's don't we'll I'M they've she'd you're O'Neil's",
    "digits 0123456789, 3.14159, 1,000,000 and 2nd/3rd 42nd",
    "ＦＵＬＬ ｗｉｄｔｈ and ﬁ ligature",
    "日本語のテキスト 中文字符 한국어 Ελληνικά ΣΟΦΟΣ İstanbul",
    "\x00control\x1b[31mred\x1b[0m\r\nline",
    "non\u00a0breaking\u2003em\u200bzero-width",
    "a.<|endoftext|>b <|startoftext|> x<|endoftext|>",
    "!!!??? ... --- *** ###",
    "word " * 120,  # Truncated at the context length.
    "supercalifragilisticexpialidocious " * 30,
]


def test_same_ids_as_a_rust_bpe_on_every_demo_and_eval_caption(tok, fast_tokenizer):
  corpus = demo.possible_captions() + bench_tokenizer.zero_shot_prompts() + HARD_CAPTIONS
  np.testing.assert_array_equal(tok(corpus), fast_tokenizer(corpus))


@pytest.mark.parametrize("text", HARD_CAPTIONS)
def test_same_ids_as_a_rust_bpe_on_hard_captions_one_at_a_time(tok, fast_tokenizer, text):
  np.testing.assert_array_equal(tok(text), fast_tokenizer(text))
  assert tok.encode(text) == fast_tokenizer.encode(text)


def test_over_long_caption_is_cut_before_eot(tok):
  ids = tok.encode("word " * 120)
  assert len(ids) == 120
  out = tok("word " * 120)[0]
  np.testing.assert_array_equal(out, [SOT] + ids[:75] + [EOT])


# IDs produced by OpenAI's `clip.tokenize` (and open_clip's).
@pytest.mark.parametrize(
    "text, ids",
    [
        ("a photo of a cat", [SOT, 320, 1125, 539, 320, 2368, EOT]),
        ("hello world!", [SOT, 3306, 1002, 256, EOT]),
        ("", [SOT, EOT]),
    ],
)
def test_known_openai_ids(tok, text, ids):
  out = tok(text)
  assert out.dtype == np.int32 and out.shape == (1, 77)
  np.testing.assert_array_equal(out[0, : len(ids)], ids)
  assert not out[0, len(ids) :].any(), "padding must be 0 (open_clip)"


def test_vocabulary_layout():
  merges = tokenizer_lib.load_merges()
  vocab = tokenizer_lib.build_vocab(merges)
  assert len(merges) == 48894
  assert len(vocab) == 49408
  assert vocab[SOT] == "<|startoftext|>" and vocab[EOT] == "<|endoftext|>"
  assert vocab[ord("a") - ord("!")] == "a"  # Byte symbols come first.


def test_text_is_cleaned_like_openai(tok):
  # Case, repeated whitespace and (double-)escaped HTML do not change IDs.
  np.testing.assert_array_equal(tok("  HELLO \n\t World!  "), tok("hello world!"))
  np.testing.assert_array_equal(tok("fish &amp;amp; chips"), tok("fish & chips"))


def test_truncation_keeps_eot_last():
  short = tokenizer_lib.get_tokenizer(5)
  out = short(["a photo of a cat", "cat"])
  np.testing.assert_array_equal(out[0], [SOT, 320, 1125, 539, EOT])
  np.testing.assert_array_equal(out[1], [SOT, 2368, EOT, 0, 0])
  # EOT pooling takes the argmax id: it must find EOT in every row.
  assert (out.argmax(-1) == [4, 2]).all()


def test_batch_of_texts(tok):
  out = tok(["a photo of a cat", "hello world!"])
  assert out.shape == (2, 77)
  np.testing.assert_array_equal(out[1, :5], [SOT, 3306, 1002, 256, EOT])


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=string.ascii_letters + string.digits + " .,!?'-", max_size=60))
def test_matches_transformers_clip_tokenizer(tok, hf_tokenizer, text):
  expected = hf_tokenizer(text)["input_ids"]
  got = tok(text)[0]
  np.testing.assert_array_equal(got[: len(expected)], expected[:77])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=12), min_size=1, max_size=8))
def test_decode_inverts_encode(tok, words):
  text = " ".join(words)
  assert tok.decode(tok(text)[0]) == text


def test_unicode_round_trip(tok):
  assert tok.decode(tok("naïve café 🙂")[0]) == "naïve café 🙂"


def test_pickles_small_and_equal(tok):
  tok("warm the word cache")
  blob = pickle.dumps(tok)
  assert len(blob) < 1000, "workers should rebuild it, not receive the vocab"
  clone = pickle.loads(blob)
  np.testing.assert_array_equal(clone("a photo of a cat"), tok("a photo of a cat"))


def test_bad_input_raises_clear_errors(tok):
  with pytest.raises(TypeError, match="str captions"):
    tok(["fine", 3])
  with pytest.raises(ValueError, match="context_length"):
    tokenizer_lib.Tokenizer(1)
