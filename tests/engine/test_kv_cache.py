"""The KV cache's blocks: shared by the choices of a request, freed by their last holder, copied at the fork."""
from __future__ import annotations

import torch

from multilora.engine.kv_cache import KVCache


def cache(num_blocks: int = 8, block_size: int = 4) -> KVCache:
    return KVCache(num_layers=2, num_blocks=num_blocks, block_size=block_size, kv_heads=2, head_dim=3,
                   dtype=torch.float32, device=torch.device("cpu"))


def test_choice_blocks_share_the_prompts_full_blocks_only():
    kv = cache(block_size=4)
    assert kv.choice_blocks(prompt_tokens=6, total_tokens=11) == (1, 2)  # block 0 shared; 1 (partial) and 2 own
    assert kv.choice_blocks(prompt_tokens=8, total_tokens=9) == (2, 1)  # a prompt of whole blocks: all shared
    assert kv.choice_blocks(prompt_tokens=3, total_tokens=4) == (0, 1)
    shared, own = kv.choice_blocks(6, 11)
    assert shared + own == kv.blocks_for(11)  # one choice takes what a request always took


def test_a_shared_block_is_free_again_only_when_its_last_holder_frees_it():
    kv = cache(num_blocks=8)
    blocks = kv.allocate(3)
    kv.share(blocks[:1], holders=2)  # three block tables hold the first block
    assert [kv.holders(b) for b in blocks] == [3, 1, 1] and kv.num_free == 5
    kv.free(blocks[:1])
    kv.free(blocks[:1])
    assert kv.num_free == 5 and kv.holders(blocks[0]) == 1
    kv.free(blocks)
    assert kv.num_free == 8 and [kv.holders(b) for b in blocks] == [0, 0, 0]
    assert sorted(kv.allocate(8)) == list(range(8)) and kv.allocate(1) is None


def test_copy_blocks_copies_every_layers_keys_and_values_and_nothing_else():
    kv = cache(num_blocks=4, block_size=4)
    for k, v in kv.layers:
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
    before = [(k.clone(), v.clone()) for k, v in kv.layers]
    kv.copy_blocks([(1, 3), (1, 0)])
    for (k, v), (k0, v0) in zip(kv.layers, before):
        for dst in (3, 0):
            assert torch.equal(k[dst * 4:dst * 4 + 4], k0[4:8]) and torch.equal(v[dst * 4:dst * 4 + 4], v0[4:8])
        assert torch.equal(k[4:12], k0[4:12]) and torch.equal(v[4:12], v0[4:12])  # blocks 1 and 2 untouched
    kv.copy_blocks([])  # nothing to copy: a prompt of whole blocks
