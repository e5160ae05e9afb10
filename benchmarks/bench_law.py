"""The AR law over model families, one command per setting; writes benchmarks/results/law_<setting>/.

    nice -n 10 .venv/bin/python benchmarks/bench_law.py resnet-cifar10          # runs now
    nice -n 10 .venv/bin/python benchmarks/bench_law.py zoo --family A,B,C,...  # Section 5.3: the trainer's
        LSTM/GRU/Transformer family (same word vocabulary) on --data (default ptb-test)
    nice -n 10 .venv/bin/python benchmarks/bench_law.py smollm2-slms --family smollm2-135m,SLM1,SLM2,...
        # Table 2's setting: SmolLM2-135M with SLMs trained on its tokenizer, on --data

Each pair: NLL-optimal k*, improvement domain, gain at k*, the exact accuracy curve (three sets,
flips), the mainstay-deviation statistic; then log10 k* against log10 r with residuals.
Scores are cached, so a second run only recomputes the analysis (seconds).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESNETS = "resnet56,resnet44,resnet32,resnet20"


def run_setting(setting: str, family: str | None, data: str | None, out_root: Path, progress: bool = False,
                window: int = 1024, stride: int = 512) -> dict:
    from arfuse.search.law import Member, analyse_family, write_plots, write_tables
    from arfuse.tasks.law import family_members

    t0 = time.time()
    if setting == "resnet-cifar10":
        from arfuse.tasks.classification import score_family

        family = family or RESNETS
        data = data or "cifar10-test[:100]"
        models, ds, recs = score_family(family.split(","), data, progress=progress)
        members = [Member(m.info.name, m.info.num_parameters, r, s) for m, r, s in zip(models, recs, family.split(","))]
        info = {"name": data, "source": ds.source if hasattr(ds, "source") else data, "tokens": len(recs[0]),
                "windowing": "one image per example (10 classes, all kept)", "unit": "images"}
    else:
        from arfuse.scoring.scorer import ScoreConfig

        if not family:
            raise SystemExit(f"setting {setting!r} needs --family A,B,C (the trainer's checkpoints)")
        data = data or "ptb-test"
        members, info = family_members(family.split(","), data, ScoreConfig(window=window, stride=stride),
                                       progress=progress)
        info["unit"] = "tokens"
    rep = analyse_family(members, info)
    rep.data["command"] = (f"python benchmarks/bench_law.py {setting} --family {family} --data {data}"
                           + (f" --window {window} --stride {stride}" if (window, stride) != (1024, 512)
                              and setting != "resnet-cifar10" else ""))
    rep.data["setting"] = setting
    rep.data["window"], rep.data["stride"] = window, stride
    out = out_root / f"law_{setting}"
    write_tables(rep, out)
    write_plots(rep, out)
    rep.data["seconds"] = round(time.time() - t0, 1)
    (out / "law.json").write_text(json.dumps(rep.to_dict(), indent=1))
    return rep.to_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("setting", choices=["resnet-cifar10", "zoo", "smollm2-slms"])
    ap.add_argument("--family")
    ap.add_argument("--data")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    rep = run_setting(args.setting, args.family, args.data, Path(args.out), progress=True, window=args.window,
                      stride=args.stride)
    from arfuse.search.law import LawReport, to_markdown

    print(to_markdown(LawReport(rep["family"], rep["data"], rep["pairs"], rep["fit"], rep["fits_per_llm"], rep["notes"])))


if __name__ == "__main__":
    main()
