"""The PyTorch peer of bench_train: a compact nanoGPT-style GPT-2 (the model of ../shared/GPU.md's peer run).

Pre-norm blocks, fused QKV projection, `scaled_dot_product_attention` (causal), tanh-GELU MLP, tied
embeddings; trained with bf16 autocast, torch.compile and fused AdamW. `load_llmjax_params` copies an
llmjax GPT-2 parameter tree into it, so a test can check that both compute the same function.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, d_model: int, num_heads: int, d_ff: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = nn.LayerNorm(d_model, eps=eps)
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)
        self.ln_2 = nn.LayerNorm(d_model, eps=eps)
        self.c_fc = nn.Linear(d_model, d_ff)
        self.mlp_proj = nn.Linear(d_ff, d_model)

    def forward(self, x):  # [batch, seq, d_model]
        batch, seq, d_model = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d_model, dim=2)
        q, k, v = (t.view(batch, seq, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))  # [b, h, s, hd]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, seq, d_model)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, max_seq_len: int, d_model: int, num_layers: int, num_heads: int, d_ff: int,
                 eps: float = 1e-5):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(max_seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, num_heads, d_ff, eps) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(d_model, eps=eps)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2's scaled init of the residual projections
            for proj in (block.c_proj, block.mlp_proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * num_layers))

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def logits(self, tokens):  # [batch, seq] -> [batch, seq, vocab]
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T

    def forward(self, tokens, targets):
        logits = self.logits(tokens)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def from_config(cfg) -> GPT:
    """The peer with an llmjax GPT-2 config's shapes (vocabulary padded as ours is)."""
    return GPT(cfg.padded_vocab_size, cfg.max_seq_len, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_ff, cfg.norm_eps)


def load_llmjax_params(model: GPT, params: dict) -> GPT:
    """Copy an llmjax GPT-2 param tree (stacked blocks) into the torch model."""

    def tensor(x):
        return torch.from_numpy(np.asarray(x, dtype=np.float32).copy())

    blocks = params["blocks"]
    with torch.no_grad():
        model.wte.weight.copy_(tensor(params["embed"]["token"]))
        model.wpe.weight.copy_(tensor(params["embed"]["position"]))
        model.ln_f.weight.copy_(tensor(params["final_norm"]["scale"]))
        model.ln_f.bias.copy_(tensor(params["final_norm"]["bias"]))
        for i, block in enumerate(model.blocks):
            attn, mlp = blocks["attn"], blocks["mlp"]
            qkv = [np.asarray(attn[name]["kernel"][i]).reshape(attn[name]["kernel"].shape[1], -1) for name in "qkv"]
            block.c_attn.weight.copy_(tensor(np.concatenate(qkv, axis=1).T))
            block.c_attn.bias.copy_(tensor(np.concatenate([np.asarray(attn[n]["bias"][i]).reshape(-1) for n in "qkv"])))
            block.c_proj.weight.copy_(tensor(np.asarray(attn["o"]["kernel"][i]).reshape(-1, attn["o"]["kernel"].shape[-1]).T))
            block.c_proj.bias.copy_(tensor(attn["o"]["bias"][i]))
            block.c_fc.weight.copy_(tensor(np.asarray(mlp["up"]["kernel"][i]).T))
            block.c_fc.bias.copy_(tensor(mlp["up"]["bias"][i]))
            block.mlp_proj.weight.copy_(tensor(np.asarray(mlp["down"]["kernel"][i]).T))
            block.mlp_proj.bias.copy_(tensor(mlp["down"]["bias"][i]))
            for norm, prefix in ((block.ln_1, "attn_norm"), (block.ln_2, "mlp_norm")):
                norm.weight.copy_(tensor(blocks[prefix]["scale"][i]))
                norm.bias.copy_(tensor(blocks[prefix]["bias"][i]))
    return model


def make_step(model: GPT, lr: float = 6e-4, compile_model: bool = True):
    """(step(tokens, targets) -> loss tensor) with bf16 autocast on CUDA, fused AdamW and torch.compile."""
    cuda = next(model.parameters()).is_cuda
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
    forward = torch.compile(model) if compile_model else model

    def step(tokens, targets):
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            loss = forward(tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step
