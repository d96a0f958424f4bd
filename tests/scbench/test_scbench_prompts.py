import pytest
import torch

from flexinference.scbench.data import Record, Turn
from flexinference.scbench.embedded import CharTokenizer, build_embedded_model
from flexinference.scbench.prompts import has_chat_template, multi_request_prompts, multi_turn_prompts
from flexinference.scbench.tasks import get_task

RECORD = Record(
    "r",
    "CONTEXT",
    (Turn("q1?", "a1"), Turn("q2?", ["x", "y"]), Turn("q3?", 7)),
)
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def hf_chatml_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, chat_template=CHATML, unk_token="[UNK]")


def test_plain_format():
    task = get_task("scbench_qa_eng")
    pieces = multi_turn_prompts(task, RECORD, None, chat=False)
    first = (
        "Read the book and answer the question. Be very concise in your answer.\n\nCONTEXT\n\nQuestion: q1?\nAnswer:"
    )
    assert pieces == [first, "a1\n\nQuestion: q2?\nAnswer:", "x, y\n\nQuestion: q3?\nAnswer:"]
    prefix, queries = multi_request_prompts(task, RECORD, None, chat=False)
    assert prefix + queries[0] == first and queries[2] == "\n\nQuestion: q3?\nAnswer:"


@pytest.mark.parametrize("make", [CharTokenizer, hf_chatml_tokenizer])
def test_chat_pieces_are_the_conversation(make):
    tok = make()
    assert has_chat_template(tok)
    task = get_task("scbench_kv")
    pieces = multi_turn_prompts(task, RECORD, tok, chat=True)
    first = task.first_message(RECORD)
    assert first == task.context_prompt(RECORD) + "\n\n" + task.query_prompt(RECORD.turns[0])
    conversation = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2?"},
        {"role": "assistant", "content": "x, y"},
        {"role": "user", "content": "q3?"},
    ]
    assert "".join(pieces) == tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert pieces[1].startswith("a1")  # the golden answer closes the previous assistant turn
    prefix, suffixes = multi_request_prompts(task, RECORD, tok, chat=True)
    for turn, suffix in zip(RECORD.turns, suffixes):
        single = task.context_prompt(RECORD) + "\n\n" + task.query_prompt(turn)
        assert prefix + suffix == tok.apply_chat_template(
            [{"role": "user", "content": single}], add_generation_prompt=True, tokenize=False
        )


class MarkLastUser(CharTokenizer):
    """A template that renders the last user message differently (no growing-prefix property), like
    templates that rewrite history; SCBench's system-prompt construction still works on it."""

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False, **kw):
        last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        text = "<s>" + "".join(
            f"<|{m['role']}|>{'*' if i == last else ''}{m['content']}<|end|>" for i, m in enumerate(messages)
        )
        return text + ("<|assistant|>" if add_generation_prompt else "")


class CountingTemplate(CharTokenizer):
    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False, **kw):
        return f"{len(messages)}:" + "".join(m["content"] for m in messages)


def test_chat_template_fallback_and_failure():
    task = get_task("scbench_kv")
    pieces = multi_turn_prompts(task, RECORD, MarkLastUser(), chat=True)
    assert pieces[1] == "a1<|end|><|user|>*q2?<|end|><|assistant|>"
    with pytest.raises(ValueError, match="cannot be continued turn by turn"):
        multi_turn_prompts(task, RECORD, CountingTemplate(), chat=True)


def test_task_specific_queries():
    choice = Record("c", "BOOK", (Turn("Who?", "B", options=("w", "x", "y", "z")),))
    text = multi_turn_prompts(get_task("scbench_choice_eng"), choice, None, chat=False)[0]
    assert text.endswith("Question: Who?\nA. w\nB. x\nC. y\nD. z\n\nThe correct answer is")
    mf = Record(
        "m", "[1, 2]", (Turn("The largest number of the list is: ", 2), Turn("The first number of the list is: ", 1))
    )
    pieces = multi_turn_prompts(get_task("scbench_mf"), mf, None, chat=False)
    assert pieces[0] == "What is the largest number of the list?\n\n[1, 2]\n\nThe largest number of the list is: "
    assert pieces[1] == "2\n\nWhat is the first number of the list?\n\nThe first number of the list is: "


def test_char_tokenizer():
    tok = CharTokenizer()
    ids = tok.encode("Hi<|end|>\n\u00e9")
    assert ids[0] == tok.bos_token_id and ids[3] == 7 and ids[-1] == tok.unk_token_id and len(ids) == 6
    assert tok.decode(ids) == "Hi\n" and tok.decode(ids, skip_special_tokens=False) == "<s>Hi<|end|>\n<unk>"
    assert tok.decode([500, 10]) == tok.decode([10])  # padded vocabulary ids decode as nothing
    assert tok("ab", add_special_tokens=False) == {"input_ids": tok.encode("ab", add_special_tokens=False)}
    assert tok.vocab_size == len(tok) <= 128
    with pytest.raises(ValueError, match="unknown chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_embedded_model_is_seeded_and_leaves_the_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    m1, _ = build_embedded_model(seed=5)
    after = torch.rand(1)
    m2, _ = build_embedded_model(seed=5)
    m3, _ = build_embedded_model(seed=6)
    assert torch.equal(before, after)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(m1.state_dict()[w], m2.state_dict()[w]) and not torch.equal(
        m1.state_dict()[w], m3.state_dict()[w]
    )
    assert m1.config.num_hidden_layers == 2 and not m1.training
