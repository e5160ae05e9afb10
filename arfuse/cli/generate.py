"""`arfuse generate --large A --small B --weight w "prompt"`: text from the fused model, printed as it comes."""
from __future__ import annotations

import argparse
import json
import sys

from arfuse.cli.common import add_rule_options, rule_params
from arfuse.errors import ArfuseError


def _g(value: str):
    if value == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: give an integer g >= 1 or 'auto' (a prompt right after a bare --speculative is read as "
            "its G: write --speculative auto, or put the prompt first)") from None


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a large model fused with small ones",
                       description="Greedy or sampled text from P = w p_LLM + (1 - w) p_SLM (or any registered "
                                   "fusion rule, --rule), "
                                   "optionally speculative: the small model drafts, the large one verifies, and the "
                                   "output still follows P exactly.")
    p.add_argument("prompt", nargs="+", help="one or more prompts ('-' reads one from standard input)")
    p.add_argument("--large", required=True, help="the large model (LLM): name, .gguf, llama2.c .bin, folder or hub id")
    p.add_argument("--small", action="append", default=[], help="a small model (SLM); repeat for several")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--weight", type=float, help="the LLM's weight w in [0, 1] (two models)")
    g.add_argument("--weights", help="comma-separated weights, the LLM first, summing to 1 (K models)")
    add_rule_options(p)
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default); > 0 samples from the fused P")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling on the fused P (default: 1, off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely fused tokens (default: 0, off)")
    p.add_argument("--stop", action="append", default=[], help="stop before this string; repeat for several")
    p.add_argument("--seed", type=int, default=0, help="random seed; prompt i samples with seed + i (default: 0)")
    p.add_argument("--speculative", type=_g, metavar="G", nargs="?", const="auto",
                   help="draft G tokens per large-model pass (who drafts: --draft); without G (or 'auto') G is "
                        "chosen from the measured acceptance rate and step times; exact for the fused distribution")
    from arfuse.generation.drafters import DRAFTERS

    p.add_argument("--draft", choices=["auto", *DRAFTERS], default="auto",
                   help="with --speculative, who drafts: " + "; ".join(f"'{n}', {d.summary}" for n, d in DRAFTERS.items())
                        + "; 'auto' (default), hybrid with a small model, lookup without one")
    p.add_argument("--draft-head", choices=["candidates", "full"], default="candidates",
                   help="while the small model drafts, score a candidate set of likely tokens and run its whole output "
                        "layer once per cycle (candidates, default; faster), or the whole layer every step (full); "
                        "the output is the same")
    p.add_argument("--strategy", choices=["token", "segment"], default="token",
                   help="token: fuse the models' next-token distributions (default); segment: segment-level "
                        "ensembling (SpecFuse), any tokenizers: each round every model drafts a segment, every model "
                        "scores every candidate, the winner goes to all (no --weight or --rule)")
    p.add_argument("--segment-len", type=int, metavar="L",
                   help="--strategy segment: tokens each model drafts per round at most, cut at a word end "
                        "(default: 10)")
    from arfuse.generation.config import SCORERS

    p.add_argument("--scorer", choices=list(SCORERS),
                   help="--strategy segment: a candidate's score by a model, the mean of its tokens' log-probabilities "
                        "(logprob, default), its log-probability per byte (byte: one unit across tokenizers) or "
                        "the mean raw logit (logit, the released SpecFuse code's choice)")
    p.add_argument("--hedge-rate", type=float, metavar="ETA",
                   help="--strategy segment: a model's weight is proportional to exp(-ETA * rounds its candidate lost "
                        "so far in this prompt) (default: 0.5)")
    p.add_argument("--patience", type=int, metavar="N",
                   help="--strategy segment: a model whose candidates lose N rounds in a row exits (default: never)")
    p.add_argument("--exit", choices=["draft", "all"],
                   help="--strategy segment with --patience: an exiting model stops drafting but still verifies "
                        "(draft, default) or leaves entirely (all)")
    p.add_argument("--truncate", choices=["error", "left"], default="error",
                   help="a prompt too long for a model's context: refuse (default) or drop its oldest tokens")
    p.add_argument("--bos", choices=["auto", "always", "never"], default="auto", help="prepend BOS (default: auto)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 is often fastest "
                                               "for small models on a busy machine)")
    p.add_argument("--placement", choices=["process", "actors"], default="process",
                   help="process: every model in this process (default); actors: each model in a Ray actor of its "
                        "own that keeps its KV cache, on this machine or a cluster (--ray-address); the same tokens "
                        "(pip install -e '.[ray]'; docs/scale-out.md)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="with --placement actors: the Ray cluster (HOST:6379, 'auto' or ray://HOST:10001; default: "
                        "start a local one)")
    p.add_argument("--stats", action="store_true", help="print speed and acceptance rate to standard error")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of streaming text")
    p.set_defaults(func=run)


def run(args) -> int:
    from arfuse.generation.api import generate

    if args.threads is not None:
        if args.threads < 1:
            raise ArfuseError(f"--threads {args.threads} must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    prompts = [sys.stdin.read() if x == "-" else x for x in args.prompt]
    stream = generate(prompts, large=args.large, small=args.small or None, weight=args.weight, weights=args.weights,
                      rule=args.rule, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, stop=args.stop,
                      seed=args.seed, speculative=args.speculative, truncate=args.truncate, bos=args.bos,
                      stream=True, device=args.device, dtype=args.dtype, draft=args.draft,
                      draft_head=args.draft_head, strategy=args.strategy, segment_len=args.segment_len,
                      scorer=args.scorer, hedge_rate=args.hedge_rate, patience=args.patience, exit=args.exit,
                      placement=args.placement, ray_address=args.ray_address,
                      **rule_params(args))
    # every prompt's length against every model's context before anything is echoed or run
    check = getattr(stream.decoder, "check_prompts", None)
    if check is not None:
        check(prompts)
    out = sys.stdout
    if args.json:
        for _ in stream:
            pass
        out.write(json.dumps([{"prompt": r.prompt, "text": r.text, "token_ids": r.token_ids,
                               "finish_reason": r.finish_reason} for r in stream.results], indent=2) + "\n")
    elif len(prompts) == 1:
        out.write(prompts[0])
        out.flush()
        for chunk in stream:
            out.write(chunk.text)
            out.flush()
        out.write("\n")
    else:  # several prompts run as one batch: each is printed when it is done
        for chunk in stream:
            if chunk.finish_reason is not None:
                text = stream.decoder.row_text(chunk.index)
                out.write(f"--- [{chunk.index}] {prompts[chunk.index]!r}\n{prompts[chunk.index]}{text}\n")
                out.flush()
    if args.stats:
        s = stream.stats
        acc = "" if s.acceptance_rate is None else (
            f"; acceptance {s.acceptance_rate:.3f} over {s.drafted} drafts, draft lengths "
            f"{min(s.draft_lengths)}-{max(s.draft_lengths)}")
        if s.cycles_by_draft:
            n_cyc = sum(s.cycles_by_draft.values())
            acc += (f"; per speculative cycle: drafting {1000 * s.draft_seconds / n_cyc:.1f} ms, verifying "
                    f"{1000 * s.verify_seconds / n_cyc:.1f} ms")
        if len(s.cycles_by_draft) > 1:
            acc += "; cycles by drafter: " + ", ".join(f"{k} {v}" for k, v in sorted(s.cycles_by_draft.items()))
        if s.draft_head_coverage is not None:
            acc += (f"; draft head: {s.draft_vocab:,} candidate tokens, the SLM's best token among them at "
                    f"{s.draft_head_coverage:.1%} of drafted positions")
        print(f"{s.new_tokens} tokens in {s.seconds:.2f} s ({s.tokens_per_second:.2f} tokens/s), {s.large_passes} "
              f"large-model passes, {s.rule}, {s.mode}{acc}", file=sys.stderr)
        if hasattr(s, "describe_rounds"):   # --strategy segment
            print(s.describe_rounds(), file=sys.stderr)
    return 0
