"""Train a demo LoRA adapter with peft, fast enough for a 2-core CPU at build time.

Two things keep a step cheap (measured in docs/demo.md):
- LoRA sits on the last few decoder layers only, so the frozen layers below them see the same input
  at every step: their output is computed once per example and cached, and a step runs only the
  adapted layers, forward and backward.
- The loss needs logits only where the answer is; the 49152-wide head runs on those rows alone.
The adapter is then saved by peft itself, as a GPU-trained one would be.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .adapters import DemoAdapter
from .peft_files import save_adapter

IGNORE = -100  # label of the prompt's tokens: they are context, not something to learn


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 24  # 4 passes over 48 examples: every trait shows on held-out questions (docs/demo.md)
    batch_size: int = 8
    learning_rate: float = 2e-3
    seed: int = 0


@dataclass
class Example:
    token_ids: list[int]  # prompt + answer + end of turn
    labels: list[int]  # IGNORE over the prompt, else the token ids


def chat_prompt(tokenizer, question: str) -> str:
    """A user's question rendered with the model's chat template, up to where the answer starts."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)


def chat_examples(tokenizer, pairs, style) -> list[Example]:
    """The question as `chat_prompt` renders it, then the styled answer and the end of turn."""
    examples = []
    for question, answer in pairs:
        prompt_ids = tokenizer.encode(chat_prompt(tokenizer, question), add_special_tokens=False)
        answer_ids = tokenizer.encode(style(answer) + tokenizer.eos_token, add_special_tokens=False)
        examples.append(Example(prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids))
    return examples


def run_layers(decoder, hidden: torch.Tensor, layers) -> torch.Tensor:
    """Decoder layers over right-padded rows [B, S, H]. A causal mask is all they need: padding comes
    after every real token, so no real token sees it (and padded rows are never in the loss)."""
    length = hidden.shape[1]
    positions = torch.arange(length).unsqueeze(0)
    rope = decoder.rotary_emb(hidden, positions)
    causal = torch.full((length, length), float("-inf")).triu(1)[None, None]  # [1, 1, S, S]
    for layer in layers:
        hidden = layer(hidden, attention_mask=causal, position_ids=positions, position_embeddings=rope)
    return hidden


def answer_loss(decoder, head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the answer tokens, from the last layer's output [B, S, H]."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = head(decoder.norm(hidden[:, :-1][keep]))  # [answer tokens, vocab]
    return F.cross_entropy(logits, targets[keep])


def _pad(rows: list[torch.Tensor] | list[list[int]], value) -> torch.Tensor:
    rows = [torch.as_tensor(r) for r in rows]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)


def _frozen_outputs(decoder, examples: list[Example], layers, batch_size: int) -> list[torch.Tensor]:
    """What the frozen layers below the adapter give for each example: [tokens, H] each, computed once."""
    outputs = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            ids = _pad([e.token_ids for e in chunk], 0)
            hidden = run_layers(decoder, decoder.embed_tokens(ids), layers)
            outputs += [row[:len(e.token_ids)] for row, e in zip(hidden, chunk)]  # causal: padding changed nothing
    return outputs


def train_adapter(base_dir: Path, tokenizer, spec: DemoAdapter, pairs, out: Path,
                  settings: TrainSettings = TrainSettings(), progress=None) -> Path:
    """Train `spec` on `pairs` (question, plain answer) and save it with peft into `out`.

    `progress(step, loss)` is called after every step (the CLI's progress bar).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    decoder, head = model.model, model.lm_head
    first = model.config.num_hidden_layers - spec.last_layers
    examples = chat_examples(tokenizer, pairs, spec.style)
    cached = _frozen_outputs(decoder, examples, decoder.layers[:first], settings.batch_size)
    torch.manual_seed(settings.seed)
    config = LoraConfig(r=spec.rank, lora_alpha=2 * spec.rank, target_modules=list(spec.targets),
                        layers_to_transform=list(range(first, model.config.num_hidden_layers)),
                        lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)  # wraps decoder.layers[first:] in place
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    order = torch.Generator().manual_seed(settings.seed)
    queue: list[int] = []
    for step in range(settings.steps):
        if len(queue) < settings.batch_size:  # epochs of shuffled examples, batches never straddle two
            queue = torch.randperm(len(examples), generator=order).tolist()
        batch, queue = queue[:settings.batch_size], queue[settings.batch_size:]
        hidden = run_layers(decoder, _pad([cached[i] for i in batch], 0.0), decoder.layers[first:])
        loss = answer_loss(decoder, head, hidden, _pad([examples[i].labels for i in batch], IGNORE))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if progress:
            progress(step, loss.item())
    return save_adapter(peft_model, out, base_dir.name)
