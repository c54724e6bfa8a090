"""Train the small MoE model that ships with moetrt as the preset ``tiny`` (moetrt/presets/tiny).

What it does, start to end, on the CPU:

1. Corpus. The docstrings of the Python standard library (PSF licence), read with ``ast`` from
   the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` in sorted order, skipping test
   suites, IDLE, lib2to3, demos and installed third-party packages; exact duplicates are
   dropped (the first occurrence wins). Nothing is downloaded.
2. Split. A module goes to the held-out part when ``sha256(module name)`` falls in the lowest
   ``--heldout-percent`` percent; the held-out sample (whole documents, at most
   ``--heldout-bytes``) is written as ``heldout.txt``. The file is the training format itself:
   each document ends with a newline and the ``</s>`` token, so ``tokenizer.encode(text)`` gives
   exactly the token stream the model sees (documents joined by ``</s>``).
3. Tokenizer. Byte-level BPE (``tokenizers``) trained on the training part: 512 tokens =
   ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, the 256 byte symbols, 253 merges. Saved as
   ``tokenizer.json`` plus a ``tokenizer_config.json`` for ``transformers.AutoTokenizer``.
4. Model. ``MoETransformer.from_config(MoEConfig.from_name("tiny"))`` trained for ``--minutes``
   with AdamW (linear warmup, constant peak, linear decay over the last quarter of the steps),
   windows of ``--seq-len`` tokens drawn at random from the
   training stream, next-token cross-entropy plus a Switch-Transformer load-balancing loss
   (``E * sum_e f_e * P_e`` per MoE layer, ``f_e`` the share of routed slots, ``P_e`` the mean
   router probability) so every expert is used while the routers still specialise.
5. Output. ``moetrt.save_pretrained`` (Hugging Face Mixtral layout: config.json +
   model.safetensors) with the tokenizer files, generation_config.json, heldout.txt, the Python
   licence and a README.md model card holding the command, the training numbers, the held-out
   loss/perplexity/bits per byte and the per-layer expert load on heldout.txt.

Determinism: everything but the step count is fixed by ``--seed``. With ``--minutes`` the
step count follows the measured step time (the machine may be shared) until the final decay
begins, and is then fixed, printed and written to the model card; the learning rate of a step
depends on the count only inside that decay, so ``--steps N`` with the same seed, thread count
and library versions repeats the run exactly. The corpus depends on the Python version whose
standard library is read.

Example (from the repository root)::

    python scripts/train_tiny.py --out moetrt/presets/tiny --overwrite
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import moetrt
from moetrt.errors import MoetrtError

PRESET = "tiny"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: the preset's pad/bos/eos ids
EOS = "</s>"
# folders of the standard library that hold no library documentation of their own
SKIP_DIRS = {
    "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages",
    "dist-packages", "__pycache__", "pydoc_data",
}
MIN_DOC_CHARS = 16  # shorter docstrings ("Return self.") carry almost nothing
# the model card's greedy samples: the prompts of the README's examples and of `moetrt demo`
SAMPLE_PROMPTS = ("Return the ", "Create a new ", "The default value is ", "If the file ", "This function ",
                  "Raise ValueError if ")
SAMPLE_TOKENS = 40


# --- corpus ---------------------------------------------------------------------------------------
@dataclass
class Corpus:
    train: list[str]  # documents, each ending with "\n"
    heldout: list[str]
    train_modules: int
    heldout_modules: int
    files_skipped: int


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_heldout(module: str, percent: float) -> bool:
    """Deterministic split by module: the first 8 bytes of sha256(name) as a fraction of 2**64."""
    value = int.from_bytes(hashlib.sha256(module.encode()).digest()[:8], "big")
    return value < percent / 100.0 * 2**64


def module_docstrings(source: bytes) -> list[str]:
    """Docstrings of the module, its classes and functions, in source order."""
    tree = ast.parse(source)
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: n.lineno)  # ast.walk is breadth-first; read the module top to bottom
    docs = []
    for node in [tree, *nodes]:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc.strip()) >= MIN_DOC_CHARS and not any(t in doc for t in SPECIAL_TOKENS):
            docs.append(doc.strip() + "\n")
    return docs


def build_corpus(stdlib: Path, heldout_percent: float) -> Corpus:
    files = sorted(p for p in stdlib.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(stdlib).parts[:-1]))
    files = [p for p in files if not p.name.startswith("_sysconfigdata")]
    seen: set[str] = set()
    train, heldout = [], []
    modules = {True: 0, False: 0}
    skipped = 0
    for path in files:
        try:
            docs = module_docstrings(path.read_bytes())
        except (SyntaxError, ValueError, UnicodeDecodeError):  # a few files are templates or py2
            skipped += 1
            continue
        name = module_name(path, stdlib)
        held = is_heldout(name, heldout_percent)
        modules[held] += 1
        for doc in docs:
            if doc in seen:
                continue
            seen.add(doc)
            (heldout if held else train).append(doc)
    if not train or not heldout:
        raise MoetrtError(f"no docstrings found under {stdlib}; is this a full Python installation?")
    return Corpus(train, heldout, modules[False], modules[True], skipped)


def heldout_sample(docs: list[str], max_bytes: int) -> str:
    """Whole held-out documents, each followed by </s>, up to max_bytes of UTF-8."""
    out, size = [], 0
    for doc in docs:
        piece = doc + EOS
        n = len(piece.encode())
        if size + n > max_bytes:
            break
        out.append(piece)
        size += n
    return "".join(out)


# --- tokenizer ------------------------------------------------------------------------------------
def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    return tok


def tokenizer_config(max_len: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }


def token_byte_lengths(tok) -> torch.Tensor:
    """UTF-8 bytes each token stands for (byte-level symbols are one byte each; specials 0)."""
    lengths = torch.zeros(tok.get_vocab_size(), dtype=torch.float64)
    for token, i in tok.get_vocab().items():
        lengths[i] = 0 if token in SPECIAL_TOKENS else len(token)
    return lengths


# --- training -------------------------------------------------------------------------------------
def load_balancing_loss(router_logits: list[torch.Tensor], router_indices: list[torch.Tensor]) -> torch.Tensor:
    """Switch-Transformer auxiliary loss averaged over MoE layers; 1.0 when perfectly balanced."""
    losses = []
    for logits, indices in zip(router_logits, router_indices):
        num_experts = logits.shape[-1]
        probs = torch.softmax(logits, dim=-1)  # [T, E]
        counts = torch.bincount(indices.reshape(-1).long(), minlength=num_experts).to(probs.dtype)  # [E]
        share = counts / counts.sum()  # f_e: share of routed (token, slot) pairs
        losses.append(num_experts * (share * probs.mean(0)).sum())
    return torch.stack(losses).mean()


class Schedule:
    """Warmup, then a stable peak, then a linear decay over the last ``decay_frac`` of the steps.

    The learning rate of a step depends on the total step count only inside the decay, so a
    time-budgeted run can keep revising the count until the decay begins; ``--steps N`` with
    the count it settled on replays the same learning rates.
    """

    def __init__(self, peak: float, floor: float, warmup: int, decay_frac: float):
        self.peak, self.floor, self.warmup, self.decay_frac = peak, floor, warmup, decay_frac

    def decay_start(self, total: int) -> int:
        return max(self.warmup, total - round(self.decay_frac * total))

    def total_decaying_from(self, step: int) -> int:
        """The smallest step count whose decay starts at ``step`` or later."""
        total = step
        while self.decay_start(total) < step:
            total += 1
        return total

    def lr(self, step: int, total: int | None) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if total is None or step < self.decay_start(total):
            return self.peak
        start = self.decay_start(total)
        progress = (step - start + 1) / max(1, total - start)
        return self.peak + (self.floor - self.peak) * min(1.0, progress)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train(model, stream: torch.Tensor, args, heldout=None) -> dict:
    """Train in place; returns the step count, warmup, seconds and the final (mean of 50 steps) losses.

    ``heldout``: ``(ids, byte_lengths)`` scored every ``args.eval_every`` steps (0: never); the
    evaluation draws no random numbers, so it leaves the run's steps unchanged.
    """
    generator = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    model.train()
    total = args.steps  # None: follows the clock until the decay begins, then fixed
    warmup = args.warmup if total is None else min(args.warmup, max(1, total // 2))
    schedule = Schedule(args.lr, args.lr * args.min_lr_ratio, warmup, args.decay_frac)
    budget = args.minutes * 60.0
    history: list[tuple[int, float, float]] = []
    curve: list[tuple[int, float]] = []  # (step, held-out loss) every --eval-every steps
    step_times: list[float] = []
    start = last_print = time.perf_counter()
    step = 0
    while total is None or step < total:
        if total is None and step >= 2 * warmup and len(step_times) >= 10:
            # the step time of the last steps (the machine's load changes) -> steps left in the budget
            recent = step_times[-25:]
            per_step = sum(recent) / len(recent)
            estimate = step + max(0, int((budget - (time.perf_counter() - start)) / per_step))
            if step >= schedule.decay_start(max(estimate, 2 * warmup)):
                total = schedule.total_decaying_from(step)
                print(f"decay from step {step}: {per_step * 1000:.0f} ms/step lately -> {total} steps in "
                      f"{args.minutes:g} min (rerun with --steps {total} to repeat this run)", flush=True)
        lr = schedule.lr(step, total)
        for group in opt.param_groups:
            group["lr"] = lr
        t_step = time.perf_counter()
        starts = torch.randint(0, stream.numel() - args.seq_len - 1, (args.batch,), generator=generator)
        window = torch.stack([stream[s : s + args.seq_len + 1] for s in starts.tolist()])  # [B, S+1]
        out = model(window[:, :-1], use_cache=False, output_router=True)
        ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), window[:, 1:].reshape(-1))
        aux = load_balancing_loss(out.router_logits, out.router_indices)
        loss = ce + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        history.append((step, ce.item(), aux.item()))
        step += 1
        now = time.perf_counter()
        step_times.append(now - t_step)
        if now - last_print >= args.print_every or step == total:
            elapsed = now - start
            tok_s = step * args.batch * args.seq_len / elapsed
            recent = history[-20:]
            ce_avg = sum(h[1] for h in recent) / len(recent)
            aux_avg = sum(h[2] for h in recent) / len(recent)
            eta = f"{(total - step) * sum(step_times[-25:]) / len(step_times[-25:]):.0f}s" if total else "?"
            print(f"step {step:5d}/{total or '?'}  loss {ce_avg:.4f}  aux {aux_avg:.4f}  lr {lr:.2e}  "
                  f"{tok_s:,.0f} tok/s  elapsed {elapsed:.0f}s  eta {eta}", flush=True)
            last_print = now
        if heldout is not None and args.eval_every and (step % args.eval_every == 0 or step == total):
            loss_now = evaluate(model, heldout[0], heldout[1], args.seq_len)["loss"]
            curve.append((step, loss_now))
            print(f"step {step:5d}  held-out loss {loss_now:.4f} (ppl {math.exp(loss_now):.2f})", flush=True)
            model.train()
    model.eval()
    last = history[-50:]
    return {
        "steps": total,
        "warmup": warmup,
        "seconds": time.perf_counter() - start,
        "final_train_loss": sum(h[1] for h in last) / len(last),
        "final_aux_loss": sum(h[2] for h in last) / len(last),
        "heldout_curve": curve,
    }


# --- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, ids: list[int], byte_lengths: torch.Tensor, seq_len: int) -> dict:
    """Loss over every token of ``ids`` but the first, in windows of seq_len (stride seq_len).

    Also counts, per MoE layer, the routed (token, slot) pairs each expert receives and the mean
    softmax mass of the chosen experts (about K/E for an untrained router).
    """
    model.eval()
    ids_t = torch.tensor(ids, dtype=torch.long)
    num_experts = model.config.num_experts
    layers = len(model.config.moe_layers)
    load = torch.zeros(layers, num_experts, dtype=torch.long)
    topk_mass = torch.zeros(layers, dtype=torch.float64)
    nats, predicted, num_bytes, routed_tokens = 0.0, 0, 0.0, 0
    for begin in range(0, len(ids) - 1, seq_len):
        window = ids_t[begin : begin + seq_len + 1]  # [S+1] (shorter at the end)
        inputs, targets = window[:-1][None], window[1:]
        out = model(inputs, use_cache=False, output_router=True)
        nats += F.cross_entropy(out.logits[0], targets, reduction="sum").item()
        predicted += targets.numel()
        num_bytes += byte_lengths[targets].sum().item()
        routed_tokens += inputs.numel()
        for i, (logits, idx) in enumerate(zip(out.router_logits, out.router_indices)):
            load[i] += torch.bincount(idx.reshape(-1).long(), minlength=num_experts)
            topk_mass[i] += torch.softmax(logits, -1).gather(-1, idx.long()).sum().item()
    loss = nats / predicted
    return {
        "tokens": predicted,
        "bytes": int(num_bytes),
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": nats / math.log(2) / num_bytes,
        "expert_load": load.tolist(),
        "imbalance": (load.max(1).values.double() / load.double().mean(1)).tolist(),
        "topk_mass": (topk_mass / routed_tokens).tolist(),
    }


@torch.no_grad()
def greedy(model, tok, prompt: str, new_tokens: int) -> str:
    ids = tok.encode(prompt).ids
    for _ in range(new_tokens):
        logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
        ids.append(int(logits.argmax()))
    return tok.decode(ids, skip_special_tokens=False)


# --- model card -----------------------------------------------------------------------------------
def curve_text(run: dict) -> str:
    """The card's line on the held-out loss during training (``--eval-every``), or nothing."""
    curve = run.get("heldout_curve") or []
    if not curve:
        return ""
    losses = ", ".join(f"{loss:.2f}" for _, loss in curve)
    return (f"Held-out loss every {curve[0][0]} steps (`--eval-every`, also in `training_log.json`): {losses}.\n\n")

def psf_notice(license_text: str) -> str:
    """PSF's notice of copyright as the licence quotes it (the licence asks to retain it)."""
    pattern = r'"(Copyright \(c\) 2001.*?Python Software Foundation;\s*All Rights Reserved)"'
    match = re.search(pattern, license_text, re.DOTALL)
    return " ".join(match[1].split()) if match else "Copyright (c) 2001 Python Software Foundation; All Rights Reserved"


def model_card(cfg, n_params: int, corpus: Corpus, stats: dict, run: dict, ev: dict, init_ev: dict,
               samples: dict[str, str], command: str, args, notice: str) -> str:
    def table_rows():
        rows = []
        for i, (counts, imb, mass, mass0) in enumerate(
            zip(ev["expert_load"], ev["imbalance"], ev["topk_mass"], init_ev["topk_mass"])
        ):
            rows.append(f"| {i} | {' '.join(str(c) for c in counts)} | {imb:.2f} | {mass:.3f} | {mass0:.3f} |")
        return "\n".join(rows)

    k, e = cfg.num_experts_per_tok, cfg.num_experts
    sample_blocks = "\n\n".join(f"`{prompt!r}`:\n\n```\n{text}\n```" for prompt, text in samples.items())
    return f"""# moetrt `tiny`: a small trained Mixture-of-Experts model

The model behind `moetrt.from_pretrained("tiny")`: a {n_params / 1e6:.2f} M-parameter Mixtral-style
decoder (softmax top-{k} routing over {e} experts with renormalisation, SwiGLU experts, RoPE,
grouped-query attention) trained on the docstrings of the Python standard library. It is small
enough to ship inside the package and to run in tests on a CPU, and trained, so its routers make
real decisions: exports, optimised graphs and engines are compared against it, and its
perplexity on `heldout.txt` shows when an artifact computes something else.

It writes docstring-like English about Python; it is a test fixture, not a useful language model.

## Files

| file | what |
|---|---|
| `config.json`, `model.safetensors` | Hugging Face Mixtral checkpoint (`MixtralForCausalLM`), float32 |
| `tokenizer.json`, `tokenizer_config.json` | byte-level BPE, {cfg.vocab_size} tokens (`tokenizers.Tokenizer.from_file`, `transformers.AutoTokenizer`) |
| `generation_config.json` | `<s>`={cfg.bos_token_id}, `</s>`={cfg.eos_token_id}, `<pad>`={cfg.pad_token_id} |
| `heldout.txt` | held-out docstrings for perplexity checks (documents joined by `</s>`) |
| `training_log.json` | the numbers of this card, machine-readable |
| `PYTHON-LICENSE.txt` | the licence of the Python distribution the corpus comes from |

## Architecture

vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} query heads / {cfg.num_key_value_heads} key-value heads
(head dim {cfg.head_dim}), {e} experts per layer, top-{k}, expert FFN {cfg.intermediate_size}, RoPE theta {cfg.rope_theta:g},
max positions {cfg.max_position_embeddings}, untied embeddings: {n_params:,} parameters
(preset `MoEConfig.from_name("tiny")`).

## Data and licence

The docstrings of the Python {platform.python_version()} standard library, read with `ast` from its `.py`
files. The text is part of Python and is used and redistributed under the PSF License Agreement
(Python Software Foundation License Version 2), whose notice of copyright reads:

> {notice}

The licence's full text, with the history of the software and the other licences involved, is in
`PYTHON-LICENSE.txt`.

Changes made to that text (a summary, as the licence asks of derivative works): only docstrings
were kept (module, class and function docstrings; test suites, IDLE, lib2to3, demos and
third-party packages skipped), their indentation was normalised as `inspect.cleandoc` does,
exact duplicates and docstrings under {MIN_DOC_CHARS} characters were dropped, and each document was
ended with a newline and `</s>`. The weights are derived from the training part; `heldout.txt` is
an excerpt of the held-out part.

| | modules | docstrings | UTF-8 bytes | tokens |
|---|---|---|---|---|
| train | {corpus.train_modules} | {len(corpus.train)} | {stats['train_bytes']:,} | {stats['train_tokens']:,} |
| held out (sha256 of the module name in the lowest {args.heldout_percent:g}%) | {corpus.heldout_modules} | {len(corpus.heldout)} | {stats['heldout_bytes']:,} | {stats['heldout_tokens']:,} |
| `heldout.txt` (whole documents up to {args.heldout_bytes:,} bytes) | | {stats['sample_docs']} | {stats['sample_bytes']:,} | {ev['tokens'] + 1:,} |

Each document ends with a newline and `</s>`; the training stream and `heldout.txt` are the
documents joined that way, so `tokenizer.encode(open("heldout.txt").read())` gives the stream the
model was evaluated on. The tokenizer (byte-level BPE, `<pad>` 0, `<s>` 1, `</s>` 2, the 256 byte
symbols, {cfg.vocab_size - 259} merges) was trained on the training part only: {stats['bytes_per_token']:.2f} bytes per token there.

## Training

```
{command}
```

{run['steps']} steps of {args.batch} windows x {args.seq_len} tokens ({run['steps'] * args.batch * args.seq_len:,} tokens, {run['steps'] * args.batch * args.seq_len / stats['train_tokens']:.1f} passes over the
training stream) in {run['seconds']:.0f} s on {args.threads} CPU thread{'s' if args.threads != 1 else ''} (torch {torch.__version__}, seed {args.seed}; `--steps {run['steps']}`
repeats the run). AdamW (betas 0.9/0.95, weight decay {args.weight_decay:g} on matrices), peak learning rate
{args.lr:g} after {run['warmup']} linear warmup steps, constant until the last {args.decay_frac:.0%} of the steps, then a linear decay
to {args.lr * args.min_lr_ratio:g}; gradient clipping {args.clip:g}.
Loss: next-token cross-entropy + {args.aux_coef:g} x Switch load-balancing loss (`E * sum_e f_e * P_e`
per MoE layer, 1.0 when balanced).

{curve_text(run)}Final train loss (mean of the last 50 steps): **{run['final_train_loss']:.4f}** nats/token
(load-balancing loss {run['final_aux_loss']:.4f}).

## Held-out evaluation (`heldout.txt`)

Windows of {args.seq_len} tokens, stride {args.seq_len}, every token but the first predicted once ({ev['tokens']:,} tokens,
{ev['bytes']:,} bytes; `</s>` counts zero bytes):

| | loss (nats/token) | perplexity | bits per byte |
|---|---|---|---|
| trained | **{ev['loss']:.4f}** | **{ev['perplexity']:.2f}** | **{ev['bits_per_byte']:.4f}** |
| same model at initialisation | {init_ev['loss']:.4f} | {init_ev['perplexity']:.2f} | {init_ev['bits_per_byte']:.4f} |
| uniform over {cfg.vocab_size} tokens | {math.log(cfg.vocab_size):.4f} | {cfg.vocab_size} | |

## Expert load on `heldout.txt`

Routed (token, slot) pairs per expert ({ev['tokens']:,} tokens x top-{k}), max/mean imbalance, and the mean
softmax mass of the {k} chosen experts (an untrained router spreads its mass: about {k}/{e} = {k / e:.3f}):

| layer | tokens per expert 0..{e - 1} | max/mean | top-{k} mass | top-{k} mass at init |
|---|---|---|---|---|
{table_rows()}

## Samples

Greedy continuations ({SAMPLE_TOKENS} tokens):

{sample_blocks}
"""


# --- main -----------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", required=True, type=Path, help="model folder to write (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out after the new model is written")
    p.add_argument("--minutes", type=float, default=4.0,
                   help="training time budget; the step count follows the measured step time until the final decay")
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps (overrides --minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--batch", type=int, default=16, help="windows per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate / peak")
    p.add_argument("--decay-frac", type=float, default=0.25, help="share of the steps in the final linear decay")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument("--aux-coef", type=float, default=0.01, help="weight of the load-balancing loss")
    p.add_argument("--heldout-percent", type=float, default=5.0, help="share of modules held out")
    p.add_argument("--heldout-bytes", type=int, default=64_000, help="cap of heldout.txt")
    p.add_argument("--print-every", type=float, default=5.0, help="seconds between progress lines")
    p.add_argument("--eval-every", type=int, default=0,
                   help="score heldout.txt every N steps to watch for over-fitting (0: only at the end)")
    p.add_argument("--sample-prompt", action="append", default=None, metavar="TEXT",
                   help="prompt of a greedy sample in the model card; repeat for several (default: the README's prompts)")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    if args.minutes <= 0:
        p.error("--minutes must be > 0")
    if args.warmup < 1:
        p.error("--warmup must be >= 1")
    if not 0 < args.decay_frac < 1:
        p.error("--decay-frac must lie in (0, 1)")
    return args


def write_model(model, out: Path, files: dict[str, str], overwrite: bool) -> None:
    """save_pretrained into ``out``; with overwrite, write beside it and swap only on success."""
    if not out.exists():
        moetrt.save_pretrained(model, out, extra_files=files)
        return
    assert overwrite  # checked before training
    staged = out.with_name(out.name + ".new")
    old = out.with_name(out.name + ".old")
    for leftover in (staged, old):
        if leftover.exists():
            raise MoetrtError(f"{leftover} exists (left by an interrupted run?); remove it and rerun")
    moetrt.save_pretrained(model, staged, extra_files=files)
    out.rename(old)
    try:
        staged.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"{args.out} already exists; pass --overwrite to replace it (or choose another --out)")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))  # the tokenizer trainer's thread pool
    torch.manual_seed(args.seed)
    command = "python scripts/train_tiny.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    cfg = moetrt.MoEConfig.from_name(PRESET)

    t0 = time.perf_counter()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = build_corpus(stdlib, args.heldout_percent)
    sample_text = heldout_sample(corpus.heldout, args.heldout_bytes)
    print(f"corpus: {len(corpus.train)} train / {len(corpus.heldout)} held-out docstrings from "
          f"{corpus.train_modules} / {corpus.heldout_modules} modules ({corpus.files_skipped} files unreadable), "
          f"{time.perf_counter() - t0:.1f}s", flush=True)

    tok = train_tokenizer(corpus.train, cfg.vocab_size)
    eos_id = tok.token_to_id(EOS)
    assert eos_id == cfg.eos_token_id
    stream: list[int] = []
    for enc in tok.encode_batch(corpus.train, add_special_tokens=False):
        stream.extend(enc.ids)
        stream.append(eos_id)
    train_stream = torch.tensor(stream, dtype=torch.long)
    heldout_ids = tok.encode(sample_text).ids
    train_bytes = sum(len(d.encode()) for d in corpus.train)
    stats = {
        "train_bytes": train_bytes,
        "train_tokens": train_stream.numel(),
        "heldout_bytes": sum(len(d.encode()) for d in corpus.heldout),
        "heldout_tokens": sum(len(e.ids) + 1 for e in tok.encode_batch(corpus.heldout, add_special_tokens=False)),
        "sample_docs": sample_text.count(EOS),
        "sample_bytes": len(sample_text.encode()),
        "bytes_per_token": train_bytes / (train_stream.numel() - len(corpus.train)),
    }
    print(f"tokenizer: {cfg.vocab_size} tokens, {stats['bytes_per_token']:.2f} bytes/token; train stream "
          f"{stats['train_tokens']:,} tokens, heldout.txt {len(heldout_ids):,} tokens", flush=True)

    model = moetrt.MoETransformer.from_config(cfg, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    byte_lengths = token_byte_lengths(tok)
    init_ev = evaluate(model, heldout_ids, byte_lengths, args.seq_len)
    print(f"model: {n_params:,} parameters; held-out loss at init {init_ev['loss']:.4f}", flush=True)

    run = train(model, train_stream, args, heldout=(heldout_ids, byte_lengths))
    ev = evaluate(model, heldout_ids, byte_lengths, args.seq_len)
    samples = {prompt: greedy(model, tok, prompt, SAMPLE_TOKENS) for prompt in args.sample_prompt or SAMPLE_PROMPTS}
    print(f"trained {run['steps']} steps in {run['seconds']:.0f}s: train loss {run['final_train_loss']:.4f}, "
          f"held-out loss {ev['loss']:.4f} (ppl {ev['perplexity']:.2f}, {ev['bits_per_byte']:.4f} bits/byte)",
          flush=True)
    for i, (counts, imb, mass) in enumerate(zip(ev["expert_load"], ev["imbalance"], ev["topk_mass"])):
        print(f"  layer {i}: expert load {counts} max/mean {imb:.2f} top-k mass {mass:.3f}", flush=True)
    for text in samples.values():
        print(f"sample: {text!r}", flush=True)

    license_path = stdlib / "LICENSE.txt"
    license_text = (
        license_path.read_text() if license_path.exists()
        else "The Python standard library is distributed under the PSF License Agreement: "
             "https://docs.python.org/3/license.html\n"
    )
    files = {
        "tokenizer.json": tok.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(tokenizer_config(cfg.max_position_embeddings), indent=2) + "\n",
        "generation_config.json": json.dumps(
            {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id},
            indent=2,
        ) + "\n",
        "heldout.txt": sample_text,
        "PYTHON-LICENSE.txt": license_text,
        "README.md": model_card(cfg, n_params, corpus, stats, run, ev, init_ev, samples, command, args,
                                psf_notice(license_text)),
        "training_log.json": json.dumps({"command": command, "stats": stats, "run": run, "heldout": ev,
                                         "heldout_at_init": init_ev}, indent=2) + "\n",
    }
    write_model(model, args.out, files, args.overwrite)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
