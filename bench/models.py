"""The two training workloads of the end-to-end suite, written with plain torch.nn modules only, so that
``pykernels.patch`` has something to swap: a character-level LSTM language model and a small GPT-2-style
decoder. Both read bytes (vocabulary 256) and return the mean cross-entropy of next-byte prediction.

The text is built in: the repository's own README.md and docs/*.md as one byte string (no download).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parent.parent
VOCAB = 256  # bytes


def corpus() -> Tensor:
    """README.md and docs/*.md (sorted) as a uint8 tensor: the same text on every machine of a given commit."""
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    data = b"\n".join(f.read_bytes() for f in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def batches(data: Tensor, batch: int, seq: int, seed: int, device: torch.device) -> Iterator[Tuple[Tensor, Tensor]]:
    """Endless (input, target) pairs of random windows, int64 (B, T), the target shifted by one byte; the same
    sequence for the same seed."""
    if data.numel() <= seq + 1:
        raise ValueError(f"batches: the corpus ({data.numel()} bytes) is shorter than seq + 1 = {seq + 1}")
    g = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq + 1)
    while True:
        starts = torch.randint(0, data.numel() - seq - 1, (batch, 1), generator=g)
        w = data[starts + offsets].to(torch.int64).to(device)
        yield w[:, :-1], w[:, 1:]


@dataclasses.dataclass(frozen=True)
class CharLSTMConfig:
    embed: int = 256
    hidden: int = 1024
    layers: int = 2


class CharLSTM(nn.Module):
    """embedding -> nn.LSTM (batch_first) -> linear -> nn.CrossEntropyLoss."""

    def __init__(self, cfg: CharLSTMConfig):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, cfg.embed)
        self.lstm = nn.LSTM(cfg.embed, cfg.hidden, cfg.layers, batch_first=True)
        self.head = nn.Linear(cfg.hidden, VOCAB)
        self.loss = nn.CrossEntropyLoss()

    def forward(self, idx: Tensor, target: Tensor) -> Tensor:
        h, _ = self.lstm(self.embed(idx))
        return self.loss(self.head(h).flatten(0, 1), target.flatten())


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    seq: int = 1024
    embed: int = 768
    heads: int = 12
    layers: int = 12
    mlp_ratio: int = 4


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)) (GPT-2)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.embed)
        self.attn = nn.MultiheadAttention(cfg.embed, cfg.heads, batch_first=True)
        self.ln2 = nn.LayerNorm(cfg.embed)
        self.mlp = nn.Sequential(nn.Linear(cfg.embed, cfg.mlp_ratio * cfg.embed), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_ratio * cfg.embed, cfg.embed))

    def forward(self, x: Tensor, causal: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False, is_causal=True)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token + position embedding -> blocks -> LayerNorm -> head tied to the token embedding -> cross-entropy."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, cfg.embed)
        self.pos = nn.Embedding(cfg.seq, cfg.embed)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.embed)
        self.loss = nn.CrossEntropyLoss()
        for emb in (self.tok, self.pos):  # GPT-2's init: with N(0, 1) the tied head starts at loss ~20
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, idx: Tensor, target: Tensor) -> Tensor:
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).triu(1)  # True = blocked (MHA's polarity)
        for block in self.blocks:
            x = block(x, causal)
        logits = F.linear(self.ln(x), self.tok.weight)  # tied output head
        return self.loss(logits.flatten(0, 1), target.flatten())


@dataclasses.dataclass(frozen=True)
class HFGPT2Config(GPTConfig):
    vocab: int = 50257  # GPT-2's: the head and its cross-entropy at a real language model's vocabulary


class HFGPT2(nn.Module):
    """Hugging Face Transformers' GPT2LMHeadModel, built from a config (no download), with its SDPA attention, tied
    head and causal-LM loss: code that calls torch.nn.functional.scaled_dot_product_attention and cross_entropy
    itself, the workload of ``pykernels.patch_functional`` (``patch`` finds no torch module to swap in it). Dropout
    off, so that every provider trains the same curve. The labels are the inputs (the model shifts them): position
    i predicts byte i + 1 and the last position nothing, so ``target`` is not used."""

    def __init__(self, cfg: HFGPT2Config):
        import transformers  # optional: without it the workload's reference fails and the suite says why
        super().__init__()
        self.lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=cfg.vocab, n_positions=cfg.seq, n_embd=cfg.embed, n_layer=cfg.layers, n_head=cfg.heads,
            n_inner=cfg.mlp_ratio * cfg.embed, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=cfg.vocab - 1, eos_token_id=cfg.vocab - 1))  # GPT-2's 50256, valid at any vocab
        self.lm.config._attn_implementation = "sdpa"

    def forward(self, idx: Tensor, target: Tensor) -> Tensor:
        return self.lm(input_ids=idx, labels=idx).loss
