"""A left-padded prompt gets the same sparse result as the prompt alone (sinks count from its first token)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import flexinference as fi


def test_left_padded_row_equals_prompt_alone():
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(8)
    prompt = torch.randint(3, 128, (1, 150), generator=g)
    ids = torch.zeros(2, 200, dtype=torch.long)
    ids[0] = torch.randint(3, 128, (200,), generator=g)
    ids[1, 50:] = prompt
    mask = torch.ones_like(ids)
    mask[1, :50] = 0
    for pattern in (fi.AShape(sink=4, local=32), fi.VerticalSlash(vertical=20, slash=40), fi.BlockTopK(32, 2)):
        with torch.no_grad(), fi.patched(model, pattern, min_sparse_len=16):
            alone = model(prompt).logits[0]
            padded = model(ids, attention_mask=mask).logits[1, 50:]
        torch.testing.assert_close(padded, alone, atol=1e-4, rtol=1e-4, msg=str(pattern))
