"""Every chat template of the real-shapes world, as it is: only assistant content is scored, the
scored characters are exactly the assistant text, the end-of-turn token is the template's own;
system text a template folds in (Gemma-3), text a template inserts (Llama-3.1's date header) and
thinking tags (Qwen3) are never scored; a conversation a template cannot render (a system message
to Mixtral's [INST] template) is skipped and counted with its reason by every step, never raised."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from asset_paths import need_asset
from core.chat import Conversation, end_of_turn_tokens, render_chat, reply_ranges, tokenize_chat
from core.errors import PivotfuseError

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "recipes" / "worlds" / "real-shapes.yaml"
SYSTEM = "You are a helpful assistant."
REPLIES = ["23 + 58 = 81.", "81 + 7 = 88."]
CHAT = [{"role": "user", "content": "What is 23 + 58?"}, {"role": "assistant", "content": REPLIES[0]},
        {"role": "user", "content": "And if you add 7?"}, {"role": "assistant", "content": REPLIES[1]}]
# each model's end-of-turn token, as its model card gives it
EOT = {"pivot": "<|end_of_turn|>", "mixtral": "</s>", "qwen3": "<|im_end|>", "gemma3": "<end_of_turn>",
       "llama3": "<|eot_id|>", "deepseek": "<｜end▁of▁sentence｜>"}
REFUSES_SYSTEM = {"mixtral"}


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    from world.shapes import make_tokenizer
    from world.spec import load_spec

    for name in ("llama2", "llama3", "qwen3", "gemma3", "deepseek_v3"):
        need_asset(name)
    spec = load_spec(SPEC)
    assert [m.name for m in spec.models] == list(EOT)  # a new model in the spec needs its row here
    return {m.name: make_tokenizer(m) for m in spec.models}


def _scored(tok, messages):
    rendered = render_chat(tok, messages)
    tc = tokenize_chat(tok, rendered)
    marked = [i for i, a in enumerate(tc.assistant) if a]
    return rendered, tc, marked


@pytest.mark.parametrize("name", list(EOT))
@pytest.mark.parametrize("system", [False, True])
def test_only_assistant_text_is_scored(tokenizers, name, system):
    tok = tokenizers[name]
    messages = ([{"role": "system", "content": SYSTEM}] if system else []) + CHAT
    if system and name in REFUSES_SYSTEM:
        with pytest.raises(PivotfuseError, match="chat template failed to render: Conversation roles must alternate"):
            render_chat(tok, messages)
        return
    rendered, tc, marked = _scored(tok, messages)
    assert EOT[name] in end_of_turn_tokens(tok)
    # the reply characters are exactly the assistant contents
    assert [rendered.text[s:e] for s, e in reply_ranges(rendered, end_of_turn_tokens(tok))] == REPLIES
    # the scored tokens, run by run, decode to exactly "reply" + its end-of-turn token
    runs, run = [], [marked[0]]
    for i in marked[1:]:
        if i == run[-1] + 1:
            run.append(i)
        else:
            runs.append(run)
            run = [i]
    runs.append(run)
    assert len(runs) == len(REPLIES)
    for run, reply in zip(runs, REPLIES):
        lo, hi = tc.offsets[run[0]][0], tc.offsets[run[-1]][1]
        assert rendered.text[lo:hi].strip() == reply + EOT[name]
        assert tok.convert_ids_to_tokens(tc.input_ids[run[-1]]) == EOT[name]  # the turn ends on its own token
    # nothing else is scored: system text, questions, role markers, inserted text
    scored_text = "".join(rendered.text[tc.offsets[i][0]:tc.offsets[i][1]] for i in marked)
    for other in [SYSTEM, "What is", "And if", "GPT4", "Assistant", "model", "<think>", "Cutting Knowledge"]:
        assert other not in scored_text


def test_gemma3_folds_the_system_message_into_the_first_user_turn(tokenizers):
    rendered, _, _ = _scored(tokenizers["gemma3"], [{"role": "system", "content": SYSTEM}] + CHAT)
    assert rendered.text.startswith(f"<bos><start_of_turn>user\n{SYSTEM}\n\nWhat is 23 + 58?<end_of_turn>\n")
    assert "<start_of_turn>system" not in rendered.text


def test_llama31_inserts_its_date_header(tokenizers):
    for messages in (CHAT, [{"role": "system", "content": SYSTEM}] + CHAT):
        rendered, _, _ = _scored(tokenizers["llama3"], messages)
        sys = SYSTEM if messages[0]["role"] == "system" else ""
        assert rendered.text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                                        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
                                        f"{sys}<|eot_id|>")


def test_qwen3_wraps_the_last_reply_in_empty_thinking_tags(tokenizers):
    rendered, _, _ = _scored(tokenizers["qwen3"], CHAT)
    assert rendered.text.endswith(f"<|im_start|>assistant\n<think>\n\n</think>\n\n{REPLIES[1]}<|im_end|>\n")
    assert f"<|im_start|>assistant\n{REPLIES[0]}<|im_end|>" in rendered.text  # earlier replies: no tags
    # a reply with its thinking in Qwen3's own layout renders as it is: the thinking is the model's
    # output too, so it is scored with the answer, tags included, and nothing around it
    own = "<think>\n7 more.\n</think>\n\n" + REPLIES[1]
    rendered = render_chat(tokenizers["qwen3"], CHAT[:3] + [{"role": "assistant", "content": own}])
    assert [rendered.text[s:e] for s, e in reply_ranges(rendered, ["<|im_end|>"])] == [REPLIES[0], own]
    # in another layout the template re-writes it: refused with the reason (steps skip and count it)
    other = CHAT[:3] + [{"role": "assistant", "content": "<think>7 more.</think>" + REPLIES[1]}]
    with pytest.raises(PivotfuseError, match="chat template dropped an assistant reply: '<think>7 more"):
        render_chat(tokenizers["qwen3"], other)


def test_openchat_pivot_generation_prompt(tokenizers):
    tok = tokenizers["pivot"]
    text = tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert text == "<s>GPT4 Correct User: What is 23 + 58?<|end_of_turn|>GPT4 Correct Assistant:"
    assert len(tok) == 32001 and tok.eos_token == "<|end_of_turn|>"  # OpenChat-3.5 adds <|end_of_turn|>


def test_unrenderable_chats_are_skipped_and_counted(tokenizers):
    """The Mixtral template refuses a system message: extraction, the world's training mix and the
    held-out loss skip that chat and count it with the reason, and go on with the others."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from evals.loss import chat_losses, summarize
    from fuse.extract.extract import prepare
    from world.shapes import renderable

    tok = tokenizers["mixtral"]
    convs = [Conversation("a", CHAT, "arith"), Conversation("b", [{"role": "system", "content": SYSTEM}] + CHAT, "arith"),
             Conversation("c", CHAT, "chat")]
    stats: Counter = Counter()
    prepared = [prepare(i, c, tok, tok.chat_template, 256, stats) for i, c in enumerate(convs)]
    assert [p is None for p in prepared] == [False, True, False]
    assert stats["skipped_template_error"] == 1 and "b: " in stats["first_template_error"]
    kept, dropped = renderable(tok, convs)
    assert [c.id for c in kept] == ["a", "c"] and dropped["skipped"] == 1
    assert "Conversation roles must alternate" in dropped["reason"]
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                             num_local_experts=2, num_experts_per_tok=1)).eval()
    losses = chat_losses(model, tok, convs, max_length=256, batch_size=2)
    assert "Conversation roles must alternate" in losses[1]["skipped"]
    assert losses[0] == losses[2]  # the same chat, scored the same beside a skipped one
    table = summarize(convs, losses)
    assert table["arith"]["chats"] == 1 and table["arith"]["skipped"] == 1 and table["all"]["skipped"] == 1
    assert "skipped" not in table["chat"]
    with pytest.raises(PivotfuseError, match="renders none of the 1 chats of domain 'x'.*roles must alternate"):
        summarize([Conversation("b", convs[1].messages, "x")], [losses[1]])
