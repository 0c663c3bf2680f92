"""Generated samples a run leaves behind (``samples.txt``) and greedy chat replies for task metrics."""

from __future__ import annotations

from pathlib import Path

import torch

from lmlab.config import RunConfig
from lmlab.data.chat import end_of_turn_id, render_prompt, resolve_template
from lmlab.models.generation import generate
from lmlab.safe_io import write_text_atomic


@torch.no_grad()
def write_samples(model: torch.nn.Module, tokenizer, cfg: RunConfig, run_dir: Path) -> Path:
    """One continuation per ``sample.prompts`` entry into ``samples.txt``.

    Prompts are prefixed with EOS, the document separator the model saw in training,
    so a prompt is read as the start of a new document.
    """
    s = cfg.sample
    gen = torch.Generator(device="cpu").manual_seed(cfg.train.seed)
    model.eval()
    blocks = []
    for prompt in s.prompts:
        ids = tokenizer.encode_document(prompt)
        new = generate(
            model,
            ids,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            eos_id=tokenizer.stop_ids,
            generator=gen,
        )
        blocks.append(prompt + tokenizer.decode(new, skip_special_tokens=True))
    return write_text_atomic(Path(run_dir) / "samples.txt", "\n\n---\n\n".join(blocks) + "\n")


@torch.no_grad()
def write_chat_samples(model, tokenizer, cfg: RunConfig, run_dir: Path) -> Path:
    """One reply per ``sample.prompts`` entry (as a user turn) into ``samples.txt``."""
    s = cfg.sample
    template = resolve_template(tokenizer, cfg.sft.chat_template)
    gen = torch.Generator(device="cpu").manual_seed(cfg.train.seed)
    stop = end_of_turn_id(tokenizer)
    model.eval()
    blocks = []
    for prompt in s.prompts:
        ids = render_prompt(tokenizer, [{"role": "user", "content": prompt}], template)
        room = cfg.model.max_seq_len - len(ids)
        if room <= 0:
            continue
        new = generate(
            model,
            ids,
            max_new_tokens=min(s.max_new_tokens, room),
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            eos_id=stop,
            generator=gen,
        )
        blocks.append(f"user: {prompt}\nassistant: {tokenizer.decode(new, skip_special_tokens=True)}")
    return write_text_atomic(Path(run_dir) / "samples.txt", "\n\n---\n\n".join(blocks) + "\n")


def chat_responder(model, tokenizer, template=None, max_new_tokens: int = 48):
    """``respond(messages) -> reply text``: greedy decoding of an assistant turn up to its end-of-turn token."""
    chat = resolve_template(tokenizer, template)
    stop = end_of_turn_id(tokenizer)
    limit = getattr(getattr(model, "cfg", None), "max_seq_len", None)

    def respond(messages: list[dict]) -> str:
        ids = render_prompt(tokenizer, messages, chat)
        room = max_new_tokens if limit is None else min(max_new_tokens, limit - len(ids))
        if room <= 0:
            return ""
        new = generate(model, ids, max_new_tokens=room, temperature=0.0, eos_id=stop)
        return tokenizer.decode(new, skip_special_tokens=True)

    return respond
