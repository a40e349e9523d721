"""Evaluation scoring: answer-letter ids in context, shot dropping, and prefix-cache path == plain path."""
import numpy as np
import pytest
import torch

from evaluation import evaluate_mmlu, evaluate_zh
from evaluation.runner import load_data
from artifacts import load_tokenizer, open_model
from evaluation.scoring import Request, SubjectPrompts, answer_letter_ids, build_requests, score_cached, score_plain
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model_and_tokenizer(eval_assets):
    model = open_model(eval_assets["model"], "cpu", "float32")
    return model, load_tokenizer(eval_assets["model"], None, model)


def test_letter_ids_are_read_in_context(eval_assets):
    tok = Tokenizer(eval_assets["tokenizer"])
    mmlu_ids = answer_letter_ids(tok, "Q?\nA. x\nB. y\nC. z\nD. w\nAnswer:", " ", bos=True)
    assert [tok.id_to_piece(i) for i in mmlu_ids] == ["▁A", "▁B", "▁C", "▁D"]
    zh_ids = answer_letter_ids(tok, "题\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：", "", bos=True)
    assert [tok.id_to_piece(i) for i in zh_ids] == ["A", "B", "C", "D"]
    # The Baichuan-7B bug: the id of "A" encoded alone is the id of "▁A", not the one after "答案：".
    assert tok.encode("A")[-1] == mmlu_ids[0] != zh_ids[0]


class MergingTokenizer:
    """Characters as ids, except that "：A" becomes one token (as a vocabulary with that merge would do)."""

    path = "merging.model"

    def encode(self, text, bos=False):
        ids, i = [1] if bos else [], 0
        while i < len(text):
            if text.startswith("：A", i):
                ids.append(100_000)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return ids

    def id_to_piece(self, i):
        return "：A" if i == 100_000 else chr(i)


def test_letter_that_merges_with_the_cue_is_a_clear_error():
    with pytest.raises(ValueError, match=r"answer letter 'A' is not one token of its own right after the answer cue"):
        answer_letter_ids(MergingTokenizer(), "题\n答案：", "", bos=True)
    # Nor may a letter take two tokens (this tokenizer has no "▁A"-like piece for " A").
    with pytest.raises(ValueError, match=r"'A' is not one token"):
        answer_letter_ids(MergingTokenizer(), "Answer:", " ", bos=False)
    # Where nothing merges, the letters' own ids come out.
    assert answer_letter_ids(MergingTokenizer(), "Answer:", "", bos=False) == tuple(map(ord, "ABCD"))


def _prompts(n_items: int = 4) -> SubjectPrompts:
    shots = [f"Shot {i} question about the law?\nA. a\nB. b\nC. c\nD. d\nAnswer: A\n\n" for i in range(5)]
    items = [f"Item {i}{' with more words' * i}?\nA. a\nB. b\nC. c\nD. d\nAnswer:" for i in range(n_items)]
    return SubjectPrompts("law", "The following are questions.\n\n", shots, items, " ")


def test_shots_dropped_from_the_end_until_the_prompt_fits(model_and_tokenizer):
    _, tok = model_and_tokenizer
    p = _prompts()
    lengths = {k: [len(tok.encode(p.prompt(i, k), bos=True)) for i in range(4)] for k in range(6)}
    limit = lengths[3][0]  # item 0 fits with 3 shots; longer items need fewer
    requests = build_requests(tok, p, limit, bos=True)
    for i, req in enumerate(requests):
        assert req.shots == max(k for k in range(6) if lengths[k][i] <= limit)
        assert req.tokens.tolist() == tok.encode(p.prompt(i, req.shots), bos=True)
        assert not req.truncated
    assert requests[0].shots == 3 and requests[3].shots < 3
    # Not even the zero-shot prompt fits: keep its last tokens, the ones next to the answer.
    tiny = build_requests(tok, p, 8, bos=True)
    assert all(r.truncated and r.shots == 0 and len(r.tokens) == 8 for r in tiny)
    assert tiny[0].tokens.tolist() == tok.encode(p.prompt(0, 0), bos=True)[-8:]


def test_fast_path_matches_plain_path_on_real_prompts(eval_assets, model_and_tokenizer):
    model, tok = model_and_tokenizer
    for bench, data_dir, split in ((evaluate_mmlu.MMLU, eval_assets["mmlu"], "test"),
                                   (evaluate_zh.CEVAL, eval_assets["ceval"], "val")):
        data = load_data(bench, data_dir, split, bench_subjects(data_dir, split), 5)
        requests = []
        for subject, (dev, items) in data.items():
            # A context too short for every prompt mixes shot counts (and groups) within each subject.
            requests += build_requests(tok, bench.prompts(subject, dev, items), 360, bos=True)
        assert len({(r.subject, r.shots) for r in requests}) > len(data)
        plain = score_plain(model, requests)
        for batch_size in (1, 3, 16):
            fast = score_cached(model, requests, batch_size)
            assert torch.equal(fast.argmax(-1), plain.argmax(-1))
            assert torch.allclose(fast.softmax(-1), plain.softmax(-1), atol=1e-5)
            assert (fast - plain).abs().max() < 1e-4


def bench_subjects(data_dir, split):
    return sorted(p.name.removesuffix(f"_{split}.csv") for p in (data_dir / split).glob("*.csv"))


def test_fast_path_is_exact_when_prompts_differ_at_the_seam(model_and_tokenizer):
    model, _ = model_and_tokenizer
    rng = np.random.default_rng(0)
    prefix = rng.integers(3, 600, 40)
    seqs = [np.concatenate([prefix, rng.integers(3, 600, n)]) for n in (1, 5, 17, 9)]
    seqs[2][39] = (seqs[2][39] + 1) % 600  # one prompt tokenized differently at the end of the shared text
    seqs.append(np.concatenate([prefix[:10], rng.integers(3, 600, 3)]))  # and one much shorter
    requests = [Request("law", i, s.astype(np.int64), 5, False, (5, 6, 7, 8)) for i, s in enumerate(seqs)]
    plain = score_plain(model, requests)
    for n, s in enumerate(seqs):  # the plain path reads the logits after each prompt's last token
        with torch.no_grad():
            expected = model(torch.from_numpy(s)[None])[0, -1, [5, 6, 7, 8]]
        assert torch.allclose(plain[n], expected, atol=1e-5)
    assert torch.allclose(score_cached(model, requests, 2), plain, atol=1e-5)
