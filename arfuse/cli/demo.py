"""`arfuse demo`: the embedded default job, with real models on real data."""
from __future__ import annotations

import time


def register(sub) -> None:
    p = sub.add_parser("demo", help="fuse SmolLM2-135M with a King James SLM arfuse trains; print the gain",
                       description="Train (first run only, then cached) a small Transformer on the first 90%% of the "
                                   "King James Bible with SmolLM2's tokenizer, fuse it with SmolLM2-135M at a weight "
                                   "chosen on one held-out part, and report the gain on another.")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--plot", metavar="PNG", help="also draw the gain against k")
    p.set_defaults(func=run)


def run(args) -> int:
    from arfuse import demo
    from arfuse.cli.eval import print_report

    t0 = time.perf_counter()
    report = demo.run_demo(progress=not args.quiet, device=args.device)
    print_report(report, plot=args.plot)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0
