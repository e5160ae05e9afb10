"""The Python API of generation: ``generate`` and the ``Stream`` of chunks it returns."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

from arfuse.adapters.base import CausalLM
from arfuse.errors import ArfuseError
from arfuse.generation.config import GenerationConfig
from arfuse.generation.decode import Chunk, Decoder, GenerationResult, GenerationStats
from arfuse.fusion.registry import get_rule, make_rule, resolve_weights

__all__ = ["generate", "Stream", "GenerationConfig", "GenerationResult", "GenerationStats", "Chunk", "Decoder",
           "build_rule"]


class Stream:
    """An iterator of ``Chunk``s as tokens are accepted; ``results`` and ``stats`` once it is exhausted."""

    def __init__(self, decoder: Decoder, prompts: list[str]):
        self.decoder = decoder
        self._it = decoder.run(prompts)

    def __iter__(self) -> Iterator[Chunk]:
        return self._it

    def __next__(self) -> Chunk:
        return next(self._it)

    @property
    def results(self) -> list[GenerationResult]:
        return self.decoder.results

    @property
    def stats(self) -> GenerationStats:
        return self.decoder.stats


def build_rule(models: Sequence[CausalLM], *, rule: str = "linear", weight: float | None = None,
               weights: Sequence[float] | None = None, **params):
    """The fusion rule ``rule`` (a name of ``arfuse.fusion.available_rules()``) for ``models`` (the
    LLM first), its weights and parameters checked, bound to the models (vocabularies checked)."""
    cls = get_rule(rule)
    ws = resolve_weights(weight, weights, len(models)) if cls.weighted else None
    if not cls.weighted and (weight is not None or weights is not None):
        raise ArfuseError(f"the {rule} rule takes no weights ({cls.summary}): drop --weight/--weights")
    if cls.weighted and ws is None:
        if len(models) != 1:
            raise ArfuseError("give the LLM's weight w (--weight, e.g. 0.9; `arfuse eval` finds the best one) "
                              "or one weight per model (--weights)")
        ws = [1.0]
    given = {k: v for k, v in params.items() if v is not None}
    fuse = make_rule(rule, ws, **given).bind(models)
    missing = [m for m in fuse.missing() if m != "weights"]
    if missing:
        ps = {p.name: p for p in cls.params}
        raise ArfuseError(f"the {rule} rule needs "
                          + "; ".join(f"its {m} ({ps[m].flag}: {ps[m].help})" for m in missing))
    return fuse


PLACEMENTS = ("process", "actors")


def _load_all(specs: list, device: str, dtype: str, placement: str = "process",
              ray_address: str | None = None) -> list[CausalLM]:
    if placement == "actors":   # each model (a spec or a loaded one) in a Ray actor of its own, loaded at once
        from arfuse.adapters.actor import actor_models

        return actor_models(specs, device=device, dtype=dtype, address=ray_address)
    return [_load(s, device, dtype) for s in specs]


def _load(spec, device: str, dtype: str) -> CausalLM:
    if isinstance(spec, CausalLM):
        return spec
    from arfuse.adapters import load_model

    return load_model(str(spec), device=device, dtype=dtype)


def generate(prompt: str | Sequence[str], *, large, small=None, weight: float | None = None,
             weights: Sequence[float] | None = None, rule: str = "linear", max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop: str | Sequence[str] | None = None,
             seed: int = 0, speculative: int | str | None = None, truncate: str = "error", bos: str = "auto",
             stop_at_eos: bool = True, stream: bool = False, device: str = "cpu", dtype: str = "float32",
             fast_kernels: bool = True, draft: str = "auto", draft_head: str = "candidates", strategy: str = "token",
             segment_len: int | None = None, scorer: str | None = None, hedge_rate: float | None = None,
             patience: int | None = None, exit: str | None = None, placement: str = "process",
             ray_address: str | None = None, **rule_params):
    """Generate from P = w p_LLM + (1 - w) p_SLM, or from any registered fusion rule (``rule``; its
    parameters as further keywords, e.g. ``rule="cosine", power=1.0``; a name the rule does not
    have fails with its parameters listed).

    ``large``/``small``: model names, paths or loaded ``CausalLM``s (``small`` may be a list).
    ``temperature == 0`` is greedy; ``speculative`` g >= 1 (or "auto") drafts with the first small
    model and verifies against P exactly. Prompt i of a list samples with seed + i, so its output
    is the same alone or in a batch. ``draft="slm"``: the small model drafts; ``draft="lookup"``
    takes the drafts from the text itself (where its last tokens occurred before); every model then
    scores them in one pass, and the output still follows P exactly; ``draft="hybrid"``: per prompt,
    the text's copy where copies have been accepted at least as often as the small model's drafts,
    the small model otherwise; ``draft="auto"`` (default): hybrid, or lookup without a small model.
    Returns a ``GenerationResult`` for one prompt, a list for a list, or a ``Stream`` of ``Chunk``s
    with ``stream=True``. ``fast_kernels=False`` keeps ``F.linear`` for every product on a CPU (the
    few-row products of verification, one-row products where two rows measured faster) and the
    whole product for output layers with repeated rows (a compact-vocabulary SLM from ``arfuse
    train``) (``arfuse.adapters.kernels``). ``draft_head="full"`` lets the drafting
    SLM run its whole output layer at every draft step instead of scoring a candidate set
    (``arfuse.generation.draft_head``); the output is the same.

    ``strategy="segment"``: segment-level ensembling (SpecFuse, ``arfuse.generation.segment``), for
    models with any tokenizers: each round every model drafts up to ``segment_len`` tokens (10), cut
    at a word end; every model scores every candidate (``scorer``: "logprob", the mean token
    log-probability, or "logit", the mean raw logit); the candidate with the highest Hedge-weighted
    sum (``hedge_rate``, 0.5) goes to all. ``patience``: a model whose candidates lose that many
    rounds in a row stops drafting (``exit="draft"``, default) or leaves (``exit="all"``). It takes
    no weights, rule or speculative decoding.

    ``placement="actors"``: each model in a Ray actor of its own (``arfuse.adapters.actor``; on the
    cluster at ``ray_address``, or a local one), which keeps its KV cache; the loop, and the tokens,
    are those of ``placement="process"`` (the default). Needs ``pip install -e '.[ray]'``.
    """
    if placement not in PLACEMENTS:
        raise ArfuseError(f"unknown placement {placement!r}: use 'process' (every model in this process) or "
                          "'actors' (each model in a Ray actor of its own)")
    if ray_address is not None and placement != "actors":
        raise ArfuseError(f"ray_address {ray_address!r} (--ray-address) places models on a Ray cluster: add "
                          "placement='actors' (--placement actors)")
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                           stop=list([stop] if isinstance(stop, str) else (stop or [])), seed=seed,
                           speculative=speculative, truncate=truncate, bos=bos,
                           stop_at_eos=stop_at_eos, fast_kernels=fast_kernels, draft=draft,
                           draft_head=draft_head)
    smalls = [] if small is None else ([small] if isinstance(small, (str, CausalLM)) else list(small))
    seg = {k: v for k, v in {"segment_len": segment_len, "scorer": scorer, "hedge_rate": hedge_rate,
                             "patience": patience, "exit": exit}.items() if v is not None}
    if strategy == "segment":
        return _generate_segments(prompt, large, smalls, cfg, seg, device=device, dtype=dtype, stream=stream,
                                  weight=weight, weights=weights, rule=rule, rule_params=rule_params,
                                  placement=placement, ray_address=ray_address)
    if strategy != "token":
        raise ArfuseError(f"unknown strategy {strategy!r}: use 'token' (fuse the models' next-token distributions) "
                          "or 'segment' (every model drafts a segment, all of them rank the candidates)")
    if seg:
        raise ArfuseError(f"{', '.join(seg)} {'is an option' if len(seg) == 1 else 'are options'} of the segment "
                          "strategy: add strategy='segment' (--strategy segment), or drop "
                          + ("it" if len(seg) == 1 else "them"))
    if get_rule(rule).weighted:  # bad weights fail before any model loads
        resolve_weights(weight, weights, 1 + len(smalls))
    models = _load_all([large, *smalls], device, dtype, placement, ray_address)
    fuse = build_rule(models, rule=rule, weight=weight, weights=weights, **rule_params)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ArfuseError("no prompts given: pass a string or a list of strings")
    if fuse.same_vocab:
        decoder = Decoder(models, fuse, cfg)
    else:  # a rule across tokenizers: each model extends its own tokens with the chosen text
        from arfuse.generation.union import UnionDecoder

        decoder = UnionDecoder(models, fuse, cfg)
    return _finish(Stream(decoder, prompts), prompt, stream)


def _generate_segments(prompt, large, smalls, cfg: GenerationConfig, seg: dict, *, device: str, dtype: str,
                       stream: bool, weight, weights, rule: str, rule_params: dict, placement: str = "process",
                       ray_address: str | None = None):
    """``generate`` with ``strategy="segment"``: options checked before any model loads."""
    from arfuse.generation.config import SegmentOptions
    from arfuse.generation.segment import SegmentDecoder

    given = [n for n, v in (("weight (--weight)", weight), ("weights (--weights)", weights)) if v is not None]
    if rule != "linear" or rule_params:
        given.append(f"a fusion rule (--rule {rule}" + "".join(f", {k}" for k in rule_params) + ")")
    if given:
        raise ArfuseError(f"the segment strategy ranks whole segments by every model's score, with Hedge weights it "
                          f"learns per prompt: it takes no {' or '.join(given)}; drop "
                          + ("it" if len(given) == 1 else "them") + " (or use --strategy token)")
    if cfg.speculative is not None:
        raise ArfuseError("the segment strategy drafts and verifies segments itself: drop --speculative")
    SegmentOptions(**seg).check_models(1 + len(smalls))
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ArfuseError("no prompts given: pass a string or a list of strings")
    models = _load_all([large, *smalls], device, dtype, placement, ray_address)
    return _finish(Stream(SegmentDecoder(models, cfg, **seg), prompts), prompt, stream)


def _finish(s: Stream, prompt, stream: bool):
    if stream:
        return s
    for _ in s:
        pass
    for r in s.results:
        r.stats = s.stats
    return s.results[0] if isinstance(prompt, str) else s.results
