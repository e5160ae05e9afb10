"""`arfuse serve --large A --small B --weight w`: an OpenAI-compatible HTTP server over the fused model."""
from __future__ import annotations

from arfuse.cli.common import add_rule_options, rule_params
from arfuse.errors import ArfuseError


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the fused model over an OpenAI-compatible HTTP API",
                       description="POST /v1/completions and /v1/chat/completions (streaming with stream: true), "
                                   "GET /v1/models and /health, from P = w p_LLM + (1 - w) p_SLM (or any token-level "
                                   "rule, --rule). Concurrent requests share decoding steps (continuous batching); "
                                   "each text equals `arfuse generate` with the same settings and seed. Needs the "
                                   "serve extra: pip install 'arfuse[serve]'.")
    p.add_argument("--large", required=True, help="the large model (LLM): name, .gguf, folder or hub id")
    p.add_argument("--small", action="append", default=[], help="a small model (SLM); repeat for several")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--weight", type=float, help="the LLM's weight w in [0, 1] (two models)")
    g.add_argument("--weights", help="comma-separated weights, the LLM first, summing to 1 (K models)")
    add_rule_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $ARFUSE_API_KEY; "
                                     "none: no key)")
    p.add_argument("--name", help="the model id clients send (default: the models' names joined by '+')")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together at most (default: 32)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a free row at most; more get 503 (default: 256)")
    p.add_argument("--max-prompt-tokens", type=int,
                   help="longer prompts get 400 (default: whatever the models' context leaves)")
    p.add_argument("--max-tokens", type=int, default=2048, help="max_tokens above this get 400 (default: 2048)")
    p.add_argument("--default-max-tokens", type=int, default=16,
                   help="/v1/completions without max_tokens (default: 16, as OpenAI)")
    p.add_argument("--default-chat-max-tokens", type=int, default=512,
                   help="/v1/chat/completions without max_tokens, cut to what the context leaves (default: 512)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGINT/SIGTERM, seconds in-flight requests may take to finish before they are "
                        "cancelled (default: 30)")
    p.add_argument("--bos", choices=["auto", "always", "never"], default="auto", help="prepend BOS (default: auto)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--placement", choices=["process", "actors"], default="process",
                   help="actors: each model (and its KV caches) in a Ray actor of its own, on this machine or "
                        "the cluster of --ray-address (needs pip install -e '.[ray]'; default: process)")
    p.add_argument("--ray-address", help="with --placement actors: the Ray cluster to place the models on "
                                         "(default: a local cluster started here)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ArfuseError(f"arfuse serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'arfuse[serve]'") \
            from None
    from arfuse.serve.server import ServeConfig, ServeLimits, serve

    if args.threads is not None:
        if args.threads < 1:
            raise ArfuseError(f"--threads {args.threads} must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    limits = ServeLimits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                         default_max_tokens=args.default_max_tokens,
                         default_chat_max_tokens=args.default_chat_max_tokens, bos=args.bos)
    cfg = ServeConfig(large=args.large, small=args.small or None, weight=args.weight, weights=args.weights, rule=args.rule,
                      rule_params=rule_params(args), host=args.host, port=args.port, api_key=args.api_key,
                      model_name=args.name, max_batch=args.max_batch, max_queue=args.max_queue, limits=limits,
                      shutdown_timeout=args.shutdown_timeout, device=args.device, dtype=args.dtype,
                      log_level=args.log_level, placement=args.placement, ray_address=args.ray_address)
    return serve(cfg)
