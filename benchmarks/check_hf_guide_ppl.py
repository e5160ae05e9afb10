"""Independent check: token perplexity by the Hugging Face perplexity guide, calling transformers directly.

Usage: python benchmarks/check_hf_guide_ppl.py MODEL_DIR_OR_GGUF TEXT_FILE [N_CHARS] [WINDOW] [STRIDE]
Compare with: arfuse score MODEL "TEXT_FILE[:N_CHARS]" --window W --stride S --bos never
"""
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_path, text_path = Path(sys.argv[1]), sys.argv[2]
n_chars, W, S = (int(x) for x in (sys.argv[3:] + ["200000", "1024", "512"][len(sys.argv) - 3:])[:3])
kw = {"gguf_file": model_path.name} if model_path.suffix == ".gguf" else {}
where = str(model_path.parent) if kw else str(model_path)
tok = AutoTokenizer.from_pretrained(where, **kw)
model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw).eval()
ids = tok(open(text_path, encoding="utf-8").read()[:n_chars], add_special_tokens=False, return_tensors="pt").input_ids
nll_sum, n_tokens, prev_end = 0.0, 0, 0
for begin in range(0, ids.size(1), S):
    end = min(begin + W, ids.size(1))
    trg_len = end - prev_end
    inp = ids[:, begin:end]
    labels = inp.clone()
    labels[:, :-trg_len] = -100
    with torch.no_grad():
        loss = model(inp, labels=labels).loss
    n_valid = (labels[:, 1:] != -100).sum().item()
    nll_sum += loss.item() * n_valid
    n_tokens += n_valid
    prev_end = end
    if end == ids.size(1):
        break
print(f"tokens {n_tokens} token_ppl {torch.exp(torch.tensor(nll_sum / n_tokens)).item():.6f}")
