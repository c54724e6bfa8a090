"""Train a small DeepSeek-V3-style MoE model on the corpus and tokenizer of the preset ``tiny``.

The model exercises everything DeepSeek-V3 routes and attends with, at ``tiny``'s scale
(D 128, 4 layers, 8 routed experts of F 192, top-2, vocabulary 512): sigmoid scoring, a
selection bias ``[E]`` that only chooses the experts, group-limited selection (4 groups of 2, the
best 2 groups by top-2 sum), normalised weights times a routed scaling factor of 2.5, one
ungated shared expert (F 192) beside the routed ones, and multi-head latent attention (MLA:
``kv_lora_rank`` 64, ``q_lora_rank`` 96, nope/rope/v head dims 32/16/32, as many KV heads as
heads). It is the model ``benchmarks/bench_ort_optimize.py``'s quality measurement uses for the
DeepSeek routing path (benchmarks/results/ort_optimize.md).

What it does, on the CPU:

1. Corpus: ``scripts/train_tiny.py``'s (the standard library's docstrings, the same held-out
   split), tokenised with the preset's own ``tokenizer.json``; the held-out text is the preset's
   ``heldout.txt``.
2. Training: ``--steps`` AdamW steps (``train_tiny``'s schedule and parameter groups), windows of
   ``--seq-len`` tokens, next-token cross-entropy only. The selection bias is not learned by
   gradient: after each step it moves by ``--bias-rate`` towards balance, as DeepSeek-V3's
   auxiliary-loss-free balancing does (``b_e += rate * sign(mean load - load_e)``), so it ends
   non-zero and the exported graphs really choose with it.
3. Output: ``model.pt`` (the state dict; :func:`load` rebuilds the model from it and
   :func:`config`) in ``--out`` with the preset's tokenizer files and ``heldout.txt``, and
   ``training_log.json`` (command, steps, seconds, held-out loss and perplexity). Not a Hugging
   Face folder: the deepseek_v3 family's config.json does not yet declare the rotary width MLA
   implies (``save_pretrained`` refuses ``rotary_dim``).

The weights (12 MB) are not shipped; regenerate them with::

    python scripts/train_deepseek_tiny.py --out /tmp/deepseek-tiny --steps 900 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import moetrt

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_tiny  # noqa: E402  (the corpus, schedule and evaluation this model shares with tiny)

PRESET_DIR = Path(moetrt.__file__).resolve().parent / "presets" / "tiny"
CONFIG = dict(
    model_type="deepseek_v3", num_key_value_heads=4, head_dim=None,
    scoring="sigmoid", selection_bias=True, n_group=4, topk_group=2, group_scoring="top2_sum",
    normalize_topk=True, routed_scaling_factor=2.5,
    shared_expert_intermediate_size=192, shared_expert_gate=False,
    kv_lora_rank=64, q_lora_rank=96, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
)


def config() -> moetrt.MoEConfig:
    """``tiny``'s sizes with DeepSeek-V3's routing, shared expert and latent attention."""
    return moetrt.MoEConfig.from_name("tiny", **CONFIG)


def load(folder: str | Path) -> moetrt.MoETransformer:
    """The model :func:`main` wrote into ``folder``, in eval mode."""
    model = moetrt.MoETransformer.from_config(config())
    model.load_state_dict(torch.load(Path(folder) / "model.pt", weights_only=True))
    return model.eval()


def balance_selection_bias(model, router_indices: list[torch.Tensor], rate: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: nudge each layer's bias towards equal load."""
    blocks = [m for m in model.modules() if getattr(m, "selection_bias", None) is not None]
    assert len(blocks) == len(router_indices), (len(blocks), len(router_indices))
    with torch.no_grad():
        for block, indices in zip(blocks, router_indices):
            load = torch.bincount(indices.reshape(-1).long(), minlength=block.selection_bias.numel()).float()
            block.selection_bias += rate * torch.sign(load.mean() - load)


def train(model, stream: torch.Tensor, args) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(train_tiny.param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95),
                            eps=1e-8)
    schedule = train_tiny.Schedule(args.lr, args.lr * args.min_lr_ratio, args.warmup, args.decay_frac)
    model.train()
    start = last_print = time.perf_counter()
    losses = []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = schedule.lr(step, args.steps)
        starts = torch.randint(0, stream.numel() - args.seq_len - 1, (args.batch,), generator=generator)
        window = torch.stack([stream[s : s + args.seq_len + 1] for s in starts.tolist()])  # [B, S+1]
        out = model(window[:, :-1], use_cache=False, output_router=True)
        loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), window[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        balance_selection_bias(model, out.router_indices, args.bias_rate)
        losses.append(loss.item())
        now = time.perf_counter()
        if now - last_print >= args.print_every or step + 1 == args.steps:
            print(f"step {step + 1:4d}/{args.steps}  loss {sum(losses[-20:]) / len(losses[-20:]):.4f}  "
                  f"elapsed {now - start:.0f}s", flush=True)
            last_print = now
    model.eval()
    return {"steps": args.steps, "seconds": time.perf_counter() - start,
            "final_train_loss": sum(losses[-50:]) / len(losses[-50:])}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="model folder to write (replaced if it exists)")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--batch", type=int, default=16, help="windows per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate / peak")
    p.add_argument("--decay-frac", type=float, default=0.25, help="share of the steps in the final linear decay")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument("--bias-rate", type=float, default=1e-2, help="selection-bias step of the load balancing")
    p.add_argument("--heldout-percent", type=float, default=5.0, help="share of modules held out (as tiny)")
    p.add_argument("--print-every", type=float, default=15.0, help="seconds between progress lines")
    return p.parse_args(argv)


def main(argv=None) -> None:
    from tokenizers import Tokenizer

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    command = "python scripts/train_deepseek_tiny.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    cfg = config()
    corpus = train_tiny.build_corpus(Path(sysconfig.get_paths()["stdlib"]), args.heldout_percent)
    tok = Tokenizer.from_file(str(PRESET_DIR / "tokenizer.json"))
    eos_id = tok.token_to_id(train_tiny.EOS)
    stream: list[int] = []
    for enc in tok.encode_batch(corpus.train, add_special_tokens=False):
        stream.extend(enc.ids)
        stream.append(eos_id)
    heldout_ids = tok.encode((PRESET_DIR / "heldout.txt").read_text()).ids
    model = moetrt.MoETransformer.from_config(cfg, seed=args.seed)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; train stream {len(stream):,} tokens",
          flush=True)
    run = train(model, torch.tensor(stream, dtype=torch.long), args)
    ev = train_tiny.evaluate(model, heldout_ids, train_tiny.token_byte_lengths(tok), args.seq_len)
    print(f"held-out loss {ev['loss']:.4f} (ppl {ev['perplexity']:.2f}); expert load {ev['expert_load']}", flush=True)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    files = {name: (PRESET_DIR / name).read_text() for name in
             ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "heldout.txt")}
    files["training_log.json"] = json.dumps(
        {"command": command, "config": CONFIG, "run": run,
         "heldout": {k: ev[k] for k in ("tokens", "loss", "perplexity", "bits_per_byte", "expert_load")}},
        indent=2) + "\n"
    for name, text in files.items():
        (args.out / name).write_text(text)
    torch.save(model.state_dict(), args.out / "model.pt")
    print(f"wrote {args.out} (held-out perplexity {math.exp(ev['loss']):.3f})", flush=True)


if __name__ == "__main__":
    main()
