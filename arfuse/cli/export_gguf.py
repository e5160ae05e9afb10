"""`arfuse export-gguf RUN OUT.gguf`: a trained SLM (GPT-2 or Llama run folder) as a GGUF file for llama.cpp."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser(
        "export-gguf", help="write a trained transformer SLM (GPT-2 or Llama) and its tokenizer as a GGUF file",
        description="Export a run folder of `arfuse train --arch transformer` to GGUF for the llama.cpp backend "
                    "(load it as llamacpp:OUT.gguf). The tokenizer goes into the file: one that came from a GGUF "
                    "file (e.g. smollm2-135m) is copied from it, after checking that it is the same; a Hugging Face "
                    "byte-level BPE (a GPT-2-style tokenizer.json, e.g. tokenizer = \"gpt2\") is written from the "
                    "run's tokenizer.json (pre-tokenizers llama.cpp knows: GPT-2's, SmolLM's, Llama 3's, Qwen2's). "
                    "Other kinds (SentencePiece, WordPiece, word-level) need --tokenizer-gguf.")
    p.add_argument("run", help="the run folder (`arfuse train --out`)")
    p.add_argument("out", help="the GGUF file to write (.gguf)")
    p.add_argument("--dtype", choices=["f32", "f16"], default="f32",
                   help="weight matrices in float32 (scores as transformers does) or float16 (half the size)")
    p.add_argument("--tokenizer-gguf", metavar="FILE", help="a GGUF file holding the run's tokenizer, whose "
                   "tokenizer metadata is copied (default: the GGUF file the run's tokenizer came from, per its "
                   "arfuse.json; else the run's byte-level BPE tokenizer.json, written out)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from arfuse.train.export_gguf import export_gguf

    res = export_gguf(args.run, args.out, dtype=args.dtype, tokenizer_gguf=args.tokenizer_gguf,
                      overwrite=args.overwrite)
    if args.json:
        print(json.dumps(res.describe(), indent=2))
        return 0
    print(f"wrote {res.path}: llama.cpp architecture {res.arch}, {res.n_tensors} tensors, {res.dtype}, "
          f"{res.n_bytes / 2**20:.1f} MiB of weights; tokenizer from {res.tokenizer_from}")
    for note in res.notes:
        print(f"  note: {note}")
    print(f"  load it with: --small llamacpp:{res.path}")
    return 0
