"""The chat template: rendering, masks, storage, and agreement with the
Hugging Face ``chat_template`` it exports (rendered by ``transformers``)."""
from __future__ import annotations

import pytest

from mtnlg.data.tokenizer import load_tokenizer
from mtnlg.errors import UserError
from mtnlg.finetune.template import ChatTemplate, check_messages, chat_prompt_ids, load_chat_template

CONVERSATIONS = [
    [{"role": "user", "content": "Who wrote the address?"}, {"role": "assistant", "content": "The President."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Year of the first address?"},
     {"role": "assistant", "content": "1790"}, {"role": "user", "content": "And the place?"},
     {"role": "assistant", "content": "New York"}],
    [{"role": "user", "content": "quote: \"we the people\" {{ braces }} {% not jinja %}"},
     {"role": "assistant", "content": "It's the preamble\n(line two)"}],
]


def test_jinja_export_renders_like_ours_in_transformers(sotu_small):
    transformers = pytest.importorskip("transformers")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=sotu_small + ".tokenizer.json")
    t = ChatTemplate()
    tok.chat_template = t.to_jinja()
    for conv in CONVERSATIONS:
        assert tok.apply_chat_template(conv, tokenize=False) == t.text(conv)
        prompt = conv[:-1]
        assert tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == \
            t.text(prompt, add_generation_prompt=True)


def test_only_assistant_content_and_end_are_trained(sotu_small):
    tok = load_tokenizer(sotu_small + ".tokenizer.json")
    t = ChatTemplate()
    ids, mask = t.encode(tok, CONVERSATIONS[1])
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == tok.encode("1790") + [tok.eod_id] + tok.encode("New York") + [tok.eod_id]
    assert tok.decode(ids) == t.text(CONVERSATIONS[1])
    # the generation prompt is the training sequence's prefix, token for token
    prompt, _ = t.encode(tok, CONVERSATIONS[1][:4], add_generation_prompt=True)
    assert ids[:len(prompt)] == prompt


def test_template_is_stored_and_checked(tmp_path, sotu_small):
    tok = load_tokenizer(sotu_small + ".tokenizer.json")
    ChatTemplate(user_prefix="### User:\n").save(tmp_path)
    assert load_chat_template(tmp_path).user_prefix == "### User:\n"
    assert tok.decode(chat_prompt_ids(tmp_path, tok, "hi")) == "### User:\nhi\n<|assistant|>\n"
    (tmp_path / "chat_template.json").write_text('{"user_prefix": 3, "bogus": 1}')
    with pytest.raises(UserError, match="is not a chat template"):
        load_chat_template(tmp_path)
    assert load_chat_template(tmp_path / "nowhere") is None


@pytest.mark.parametrize("messages, problem", [
    ([], "non-empty list"),
    ([{"role": "user"}], "must be an object with \"role\" and \"content\""),
    ([{"role": "bot", "content": "x"}], "expected one of system, user, assistant"),
    ([{"role": "user", "content": 1}], "content is int"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only the first message"),
])
def test_bad_conversations_are_named(messages, problem):
    assert problem in check_messages(messages)
