"""The engine on tiny real models: a random one (cache vs no cache, sampling) and a "successor" model whose
next token is a fixed function of the current one, wired to walk through a calculator call."""

import torch

from nanopipe.chat_eval import scored_text
from nanopipe.engine import Engine, ReplyDecoder, greedy_samples
from nanopipe.gpt import GPTConfig, build_model
from nanopipe.tokenizer import SPECIAL_TOKENS
from tasks.common import last_number
from tests.conftest import noisy_gpt


def successor_model(tokenizer, successor: dict[int, int]):
    """A 1-layer GPT whose blocks are the identity (zero output projections, as init_weights leaves them), so
    the logits depend on the current token only; lm_head is set so that argmax(next | t) = successor[t]."""
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=64, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    model = build_model(config, "cpu")
    with torch.no_grad():
        wte = model.transformer.wte.weight
        wte.copy_(torch.nn.functional.normalize(torch.randn_like(wte), dim=-1))
        model.lm_head.weight.zero_()
        for t, nxt in successor.items():
            model.lm_head.weight[nxt] += 2 * wte[t]
    return model.eval()


def naive_greedy(model, tokens, steps):
    """Greedy decoding recomputing the whole sequence every step (no cache)."""
    ids = list(tokens)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]))[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(tokens):]


def test_greedy_with_cache_matches_recomputing(tokenizer):
    model = noisy_gpt(tokenizer, seq_len=64, noise=0.3)
    prompt = tokenizer.encode("The capital of", prepend=tokenizer.bos_token_id)
    engine = Engine(model, tokenizer, use_tools=False)
    streamed = [step[0] for step in engine.generate(prompt, max_tokens=20, temperature=0.0)]
    tokens = [t for t, _ in streamed]
    assert all(not forced for _, forced in streamed)
    stop = next((i for i, t in enumerate(tokens) if t in engine.stop_tokens), None)
    expected = naive_greedy(model, prompt, len(tokens))
    assert tokens == expected
    assert len(tokens) == 20 or stop == len(tokens) - 1


def test_samples_share_one_prefill(tokenizer):
    model = noisy_gpt(tokenizer, seq_len=64, noise=0.3, seed=1)
    prompt = tokenizer.encode("One two three four", prepend=tokenizer.bos_token_id)
    widths = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(tuple(args[0].shape)),
                                           with_kwargs=True)
    try:
        engine = Engine(model, tokenizer)
        sequences = engine.generate_batch(prompt, num_samples=3, max_tokens=8, temperature=0.0)
    finally:
        hook.remove()
    assert widths[0] == (1, len(prompt))                   # one prefill of the prompt ...
    assert all(w == (3, 1) for w in widths[1:])            # ... then one token per row per step
    assert sequences[0] == sequences[1] == sequences[2]    # greedy: identical rows
    assert sequences[0][:len(prompt)] == prompt
    generated = sequences[0][len(prompt):]
    assert generated == naive_greedy(model, prompt, len(generated))


def test_sampling_is_seeded_and_top_k_1_is_greedy(tokenizer):
    model = noisy_gpt(tokenizer, seq_len=64, noise=0.3, seed=2)
    prompt = tokenizer.encode("Hello", prepend=tokenizer.bos_token_id)
    engine = Engine(model, tokenizer)
    a = engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=1.5, seed=7)
    b = engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=1.5, seed=7)
    c = engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=1.5, seed=8)
    assert a == b and a != c
    assert len({tuple(s) for s in a}) > 1                  # rows sample independently
    greedy = engine.generate_batch(prompt, max_tokens=10, temperature=0.0)
    top1 = engine.generate_batch(prompt, max_tokens=10, temperature=1.0, top_k=1, seed=3)
    assert top1 == greedy


def chain(tokenizer, *parts):
    """successor mapping that walks through the given token ids in order"""
    ids = [t for part in parts for t in part]
    assert len(set(ids[:-1])) == len(ids) - 1, "a token would need two successors"
    return dict(zip(ids[:-1], ids[1:]))


def test_calculator_output_is_forced(tokenizer):
    special = tokenizer.encode_special
    ps, pe = special("<|python_start|>"), special("<|python_end|>")
    os_, oe, end = special("<|output_start|>"), special("<|output_end|>"), special("<|assistant_end|>")
    start = tokenizer.encode("Sure")[-1]
    expr = tokenizer.encode("6*7")
    answer = tokenizer.encode("42")
    # start -> ps -> 6 * 7 -> pe -> end; and after the forced output: oe -> end
    successor = chain(tokenizer, [start, ps], expr, [pe, end])
    successor[oe] = end
    model = successor_model(tokenizer, successor)
    prompt = [tokenizer.bos_token_id, start]

    steps = list(Engine(model, tokenizer, use_tools=True).generate(prompt, max_tokens=30, temperature=0.0))
    tokens, forced = [s[0][0] for s in steps], [s[0][1] for s in steps]
    assert tokens == [ps, *expr, pe, os_, *answer, oe, end]
    assert forced == [False] * (len(expr) + 2) + [True] * (len(answer) + 2) + [False]

    # the same model without the tool: nothing is forced, the model's own successor of <|python_end|> follows
    steps = list(Engine(model, tokenizer, use_tools=False).generate(prompt, max_tokens=30, temperature=0.0))
    assert [s[0] for s in steps] == [(t, False) for t in [ps, *expr, pe, end]]

    sequences = Engine(model, tokenizer).generate_batch(prompt, num_samples=2, max_tokens=30, temperature=0.0)
    assert sequences == [prompt + [ps, *expr, pe, os_, *answer, oe]] * 2   # stop token left out


def test_refused_expression_forces_nothing(tokenizer):
    special = tokenizer.encode_special
    ps, pe, end = special("<|python_start|>"), special("<|python_end|>"), special("<|assistant_end|>")
    start = tokenizer.encode("Sure")[-1]
    expr = tokenizer.encode("x*y")
    model = successor_model(tokenizer, chain(tokenizer, [start, ps], expr, [pe, end]))
    steps = list(Engine(model, tokenizer).generate([tokenizer.bos_token_id, start], max_tokens=30, temperature=0.0))
    assert [s[0] for s in steps] == [(t, False) for t in [ps, *expr, pe, end]]


def test_stops_on_bos_and_max_tokens_and_reports_finished_rows(tokenizer):
    bos = tokenizer.bos_token_id
    a, b = tokenizer.encode("Sure")[-1], tokenizer.encode("Hello")[-1]
    model = successor_model(tokenizer, {a: b, b: bos})
    engine = Engine(model, tokenizer)
    steps = list(engine.generate([bos, a], max_tokens=30, temperature=0.0))
    assert [s[0][0] for s in steps] == [b, bos]
    # a loop a -> b -> a ... never ends by itself: max_tokens does
    model = successor_model(tokenizer, {a: b, b: a})
    steps = list(Engine(model, tokenizer).generate([bos, a], num_samples=2, max_tokens=5, temperature=0.0))
    assert len(steps) == 5 and all(len(s) == 2 for s in steps)


def test_finished_rows_yield_none(tokenizer):
    # uniform logits (lm_head zero): rows sample different tokens, so they end at different steps
    bos = tokenizer.bos_token_id
    model = successor_model(tokenizer, {})
    steps = list(Engine(model, tokenizer).generate([bos], num_samples=8, max_tokens=200, temperature=1.0, seed=0))
    columns = [[s[row][0] for s in steps] for row in range(8)]
    assert sum(None in column for column in columns) >= 2   # with this seed, several rows end early
    for column in columns:
        if None in column:
            first_none = column.index(None)
            assert column[first_none - 1] in (bos, tokenizer.encode_special("<|assistant_end|>"))
            assert all(t is None for t in column[first_none:])


def test_greedy_samples_are_the_prompt_and_its_continuation_up_to_a_stop(tokenizer):
    prompt = "The capital of"
    words = tokenizer.encode(" Quen is Lorv")
    model = successor_model(tokenizer, chain(tokenizer, tokenizer.encode(prompt)[-1:], words, [tokenizer.bos_token_id]))
    assert greedy_samples(model, tokenizer, [prompt, prompt], max_tokens=16) == [prompt + " Quen is Lorv"] * 2
    assert greedy_samples(model, tokenizer, [prompt], max_tokens=2) == [prompt + tokenizer.decode(words[:2])]


def test_reply_decoder_shows_whole_characters_and_marks_tool_calls(tokenizer):
    """Multi-byte characters split over byte tokens appear once complete; calculator calls are marked as the CLI
    shows them and become python / python_output parts; what was shown adds up to the whole reply."""
    special = tokenizer.encode_special
    text_ids = tokenizer.encode("Größe ≈ 5 ")
    reply = [*text_ids, special("<|python_start|>"), *tokenizer.encode("2+3"), special("<|python_end|>"),
             special("<|output_start|>"), *tokenizer.encode("5"), special("<|output_end|>"),
             *tokenizer.encode(" so 5 ✓"), *tokenizer.encode("é")[:1]]  # the last character cut mid-way
    assert len(tokenizer.encode("é")) > 1  # a character of two byte tokens
    decoder = ReplyDecoder(tokenizer)
    shown = [decoder.feed(t) for t in reply]
    assert all("\ufffd" not in piece for piece in shown)
    tail = decoder.flush()
    assert "".join(shown) + tail == "Größe ≈ 5 ⟦calc: 2+3 → 5⟧ so 5 ✓\ufffd"
    assert decoder.finish() == [{"type": "text", "text": "Größe ≈ 5 "}, {"type": "python", "text": "2+3"},
                                {"type": "python_output", "text": "5"}, {"type": "text", "text": " so 5 ✓\ufffd"}]


def test_reply_decoder_hides_the_answer_marker_line_but_keeps_it_in_the_parts(tokenizer):
    """The GSM8K `#### n` line is the evaluator's: streamed token by token, a person never sees any of it
    (not even a `#` while it is being written), other `#`s and newlines show, and the parts keep the reply
    as the model wrote it (the next turn's history)."""
    special = tokenizer.encode_special
    first = "Item #3 has\n2 rows:\n"
    reply = [*tokenizer.encode(first), special("<|python_start|>"), *tokenizer.encode("2*3"),
             special("<|python_end|>"), special("<|output_start|>"), *tokenizer.encode("6"),
             special("<|output_end|>"), *tokenizer.encode(" 6 seats.\n#### 6")]
    decoder = ReplyDecoder(tokenizer)
    shown = []
    for token in reply:
        shown.append(decoder.feed(token))
        assert "####" not in "".join(shown)
    assert all("#" not in piece for piece in shown[len(tokenizer.encode(first)):])
    assert "".join(shown) + decoder.flush() == "Item #3 has\n2 rows:\n⟦calc: 2*3 → 6⟧ 6 seats."
    assert decoder.finish()[-1] == {"type": "text", "text": " 6 seats.\n#### 6"}
    decoder = ReplyDecoder(tokenizer)
    assert "".join(decoder.feed(t) for t in tokenizer.encode("ends with\n##")) + decoder.flush() == "ends with\n##"


def test_a_completion_is_scored_with_its_tool_parts_apart(tokenizer):
    """chat_eval reads the last number of a completion: a calculator call, its output and the sentence after
    them are separate texts, not one glued number ("12*78484")."""
    special = tokenizer.encode_special
    tokens = [*tokenizer.encode("12 * 7 = "), special("<|python_start|>"), *tokenizer.encode("12*7"),
              special("<|python_end|>"), special("<|output_start|>"), *tokenizer.encode("84"),
              special("<|output_end|>"), *tokenizer.encode("84.")]
    specials = {special(name) for name in SPECIAL_TOKENS}
    text = scored_text(tokenizer, tokens, specials)
    assert last_number(text) == "84" and "<|" not in text
