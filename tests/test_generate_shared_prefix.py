"""generate_ragged with a shared prefix's keys and values (prefill_prefix) and with a per-row stop (until)."""
import pytest
import torch

from model import ModelConfig, Transformer
from model.generate import common_prefix_length, generate_ragged, prefill_prefix


def make(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("debug", **{"attn_impl": "eager", "n_kv_heads": 2,
                                                           **overrides})).eval()


def prompts_with_prefix(prefix_len: int = 24) -> tuple[list[int], list[list[int]]]:
    torch.manual_seed(1)
    prefix = torch.randint(0, 512, (prefix_len,)).tolist()
    own = [torch.randint(0, 512, (n,)).tolist() for n in (5, 1, 9, 3)]
    prompts = [prefix + o for o in own]
    prompts.append(prefix[:10])  # shorter than the prefix: only its first 9 tokens come from the prefix
    prompts.append(prefix[:15] + [(prefix[15] + 1) % 512] + own[0])  # differs inside the prefix
    return prefix, prompts


class TokenCount:
    """Counts the tokens the model embeds (what a prefill computes)."""

    def __init__(self, model: Transformer):
        self.n = 0
        model.tok_embeddings.register_forward_hook(self.hook)

    def hook(self, module, args, output) -> None:
        self.n += args[0].numel()


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_shared_prefix_gives_the_same_greedy_tokens(attn_impl):
    model = make(attn_impl=attn_impl)
    prefix, prompts = prompts_with_prefix()
    plain = generate_ragged(model, prompts, 12)
    shared = prefill_prefix(model, prefix)
    count = TokenCount(model)
    assert generate_ragged(model, prompts, 12, shared_prefix=shared) == plain
    # All rows reuse the 9 positions the shortest prompt leaves (the rest of each prompt is prefilled, padded).
    prefill = len(prompts) * (max(len(p) for p in prompts) - 9)
    assert count.n == prefill + sum(len(p) for p in plain) - len(prompts)
    # Rows that all share the whole prefix take all of it; an EOS still ends only the rows that emit it.
    head = prompts[:4]
    count.n = 0
    assert generate_ragged(model, head, 12, shared_prefix=shared) == plain[:4]
    assert count.n == len(head) * (max(len(p) for p in head) - len(prefix)) + 11 * len(head)
    eos = plain[2][4]
    assert generate_ragged(model, head, 12, eos_id=eos, shared_prefix=shared) == \
        generate_ragged(model, head, 12, eos_id=eos)


def test_shared_prefix_is_not_used_where_dynamic_rope_would_rotate_it_differently():
    model = make(rope_type="dynamic", rope_factor=2.0, rope_original_max_seq_len=28, max_seq_len=56)
    prefix, prompts = prompts_with_prefix()  # prompts of 25 to 33 tokens: some beyond the original 28
    count = TokenCount(model)
    plain = generate_ragged(model, prompts[:4], 6)
    n_plain, count.n = count.n, 0
    assert generate_ragged(model, prompts[:4], 6, shared_prefix=prefill_prefix(model, prefix)) == plain
    assert count.n == n_plain + len(prefix)  # the prefix's own prefill, then the whole prompts again


def test_until_ends_a_row_after_the_token_it_names():
    model = make()
    _, prompts = prompts_with_prefix()
    plain = generate_ragged(model, prompts, 10)
    got = generate_ragged(model, prompts, 10, until=lambda row, new: row == 1 and len(new) == 3)
    assert got[1] == plain[1][:3] and got[:1] + got[2:] == plain[:1] + plain[2:]


def test_common_prefix_length_and_bad_prefix():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4, 5], [1, 2]]) == 2
    assert common_prefix_length([[7, 1], [8]]) == 0 and common_prefix_length([[3, 4]]) == 2
    with pytest.raises(ValueError, match="shared prefix needs 1 to max_seq_len"):
        prefill_prefix(make(), [])
