"""The whole pipeline in a few minutes on a laptop CPU, with no download.

Trains a SentencePiece BPE tokenizer with Llama 2's trainer settings (byte fallback, split digits) on an English
corpus that ships with Python (the reference manual in `pydoc_data.topics`), pretrains a small Llama 2 on it,
prints the perplexity of held-out text before and after, generates a continuation, and saves the checkpoint and
loss.png.

Examples:
  llama2 demo
  llama2 demo --text wiki.test.tokens --eval-text wiki.valid.tokens --tokenizer tokenizer.model --steps 300
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

COMMAND = "demo"
HELP = "train a tokenizer and a small Llama 2 on bundled text, in minutes (no download)"

PROMPT = "The assert statement"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="llama2-demo", help="run directory (default ./llama2-demo)")
    parser.add_argument("--text", default=None, help="training text file (default: Python's pydoc topics)")
    parser.add_argument("--eval-text", default=None, help="held-out text file (default: held-out pydoc topics)")
    parser.add_argument("--tokenizer", default=None, help="use this tokenizer.model instead of training one")
    parser.add_argument("--backend", default="mindspore", help="mindspore (default) or torch")
    parser.add_argument("--mode", default="graph", choices=("graph", "eager"))
    parser.add_argument("--vocab-size", type=int, default=1024, help="size of the trained tokenizer")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--prompt", default=PROMPT, help="prompt for the generated continuation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


def bundled_corpus() -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): the topics of Python's reference manual, every 10th held out."""
    from pydoc_data.topics import topics

    docs = [topics[k].strip() for k in sorted(topics) if topics[k].strip()]
    train = [d for i, d in enumerate(docs) if i % 10 != 5]
    held = [d for i, d in enumerate(docs) if i % 10 == 5]
    return train, held


def _read_docs(path: str) -> list[str]:
    from llama2.data.wikitext import split_articles

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {p} not found")
    with open(p, encoding="utf-8") as f:
        docs = split_articles(f.read())
    if not docs:
        raise ValueError(f"{p}: the file is empty")
    return docs


def model_config(vocab_size: int, seq_length: int) -> Any:
    """A ~1M-parameter (plus embeddings) Llama 2: 4 layers, dim 128, GQA 4/2 heads, context seq_length."""
    from llama2.core.config import ModelConfig

    return ModelConfig(
        dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=352, vocab_size=vocab_size, max_seq_len=seq_length
    )


def run_demo(args: argparse.Namespace, say: Any = print) -> dict[str, Any]:
    """Run the demo; returns {"ppl_before", "ppl_after", "sample", "out", "seconds", ...}."""
    import llama2
    from llama2.commands.plot import plot_run
    from llama2.core.model import create
    from llama2.data.tokenizer import Tokenizer
    from llama2.data.wikitext import pack_documents

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    if args.text:
        train_docs = _read_docs(args.text)
        source = args.text
    else:
        train_docs, held = bundled_corpus()
        source = "Python's reference manual (pydoc_data.topics)"
    if args.eval_text:
        eval_docs = _read_docs(args.eval_text)
    elif args.text:
        n = max(1, len(train_docs) // 10)
        train_docs, eval_docs = train_docs[:-n], train_docs[-n:]
        if not train_docs:
            raise ValueError(f"{args.text}: needs at least 2 articles to hold one out, or pass --eval-text")
    else:
        eval_docs = held
    say(f"[1/5] corpus: {source}: {len(train_docs)} training documents ({sum(map(len, train_docs)):,} chars)")

    if args.tokenizer:
        tok = Tokenizer(args.tokenizer)
        say(f"[2/5] tokenizer: {args.tokenizer} ({tok.vocab_size} pieces)")
    else:
        corpus = out / "corpus.txt"
        corpus.write_text("\n".join(train_docs) + "\n", encoding="utf-8")
        tok = Tokenizer.train(corpus, out / "tokenizer", args.vocab_size, character_coverage=1.0, verbose=False)
        corpus.unlink()
        say(f"[2/5] tokenizer: trained SentencePiece BPE, {tok.vocab_size} pieces, byte fallback, split digits")

    rows, stats = pack_documents(
        (tok.encode(d) for d in train_docs), args.seq_length + 1, bos_id=tok.bos_id, eos_id=tok.eos_id
    )
    if stats.rows < args.batch_size:
        raise ValueError(
            f"the training text gives {stats.rows} rows of {args.seq_length + 1} tokens, fewer than "
            f"--batch-size {args.batch_size}; use more text or a smaller --seq-length"
        )
    cfg = model_config(tok.vocab_size, args.seq_length)
    model = create(cfg, backend=args.backend, seed=args.seed, tokenizer=tok, mode=args.mode)
    eval_opts = {"seq_length": args.seq_length, "stride": args.seq_length // 2, "batch_size": 8, "progress": False}
    before = llama2.evaluate(model, "perplexity", data=eval_docs, **eval_opts)
    say(
        f"[3/5] model: {cfg.num_parameters():,} parameters; {stats.rows} rows x {args.seq_length} tokens "
        f"({stats.tokens:,} tokens); held-out perplexity before training: {before['perplexity']:.1f} "
        f"({before['tokens']} tokens)"
    )

    run_dir = out / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    llama2.pretrain(
        model,
        data=rows,
        out_dir=run_dir,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr=args.lr / 10,
        warmup_steps=max(1, args.steps // 20),
        weight_decay=0.1,
        seed=args.seed,
        save_every=max(1, args.steps // 2),
        keep=1,
        progress=progress,
        log=lambda m: None,
    )
    after = llama2.evaluate(model, "perplexity", data=eval_docs, **eval_opts)
    say(f"[4/5] trained {args.steps} steps; held-out perplexity after training: {after['perplexity']:.1f}")
    sample = model.generate(args.prompt, max_new_tokens=40, temperature=0.0, repetition_penalty=1.2)[0]
    png = plot_run(run_dir)
    secs = time.perf_counter() - t0
    say(f"[5/5] greedy continuation of {args.prompt!r}:\n    {args.prompt}{sample}")
    say(f"checkpoint: {run_dir / 'checkpoints'}  loss curve: {png}  ({secs:.0f} s)")
    say(f"next: llama2 generate --model {run_dir} --prompt 'The' ; llama2 evaluate --model {run_dir} ...")
    return {
        "ppl_before": before["perplexity"],
        "ppl_after": after["perplexity"],
        "eval_tokens": after["tokens"],
        "sample": sample,
        "out": run_dir,
        "loss_png": png,
        "seconds": secs,
    }


def run(args: argparse.Namespace) -> int:
    run_demo(args)
    return 0
