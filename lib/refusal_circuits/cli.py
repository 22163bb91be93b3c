"""Command-line entry point: ``refusal-circuits [--verbose] <command> ...``.

    refusal-circuits refusal-rate --model NAME --prompts FILE.csv [--column instruction] [--max-new-tokens N]
    refusal-circuits refusal-table --model NAME [--out data/refusal/NAME] [--max-new-tokens 32]
    refusal-circuits refusal-report [--root data/refusal]
    refusal-circuits organism [--out data/organism]
    refusal-circuits organism-check [--out build/organism-check] [--reference data/organism]
    refusal-circuits screen --model NAME --pairs FILE.csv --out DIR [--n-pairs N] [--positions prompt|last|paper|answer]
                            [--method exact|attribution] [--top-k K] [--bottom-k K] [--no-ablation]
                            [--device cpu|cuda|auto] [--dtype ...] [--seed S]
    refusal-circuits cipher --model NAME --pairs FILE.csv --out SCREEN_DIR [--n-pairs N] [--top-k K]
                            [--max-new-tokens T] [--n-random R] [--device ...] [--seed S]

Bad input (a model that is not here, a device this torch does not have, a missing, unreadable or
non-UTF-8 file, a missing column, a parameter out of range) ends with one ``error: ...`` line on stderr
naming the file or option, and exit status 2. Library warnings are silenced unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from .engine import ALIASES, POSITIONS
from .models import DEFAULT_MODEL, ModelLoadError
from .paths import ORGANISM_DIR

POSITION_CHOICES = [*POSITIONS, *ALIASES]


def _refusal_rate(args) -> int:
    import pandas as pd

    from .generation import refusal_scores
    from .models import load_model

    from .data import read_table

    path = Path(args.prompts)
    df = read_table(path, "prompt file", [args.column], hint="Pass --column NAME.")
    prompts = [p for p in df[args.column].astype(str).tolist() if p.strip()]
    if not prompts:
        raise ValueError(f"column {args.column!r} of {path} holds no prompts.")
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    scores = refusal_scores(model, prompts, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, progress=not args.quiet)
    out = Path(args.out) if args.out else path.with_name(f"{path.stem}.{model.slug}.completions.csv")
    scores.to_csv(out, index=False)
    print(f"wrote {len(scores)} completions to {out}")
    print(f"refusal_rate={scores['refused'].mean():.4f} n={len(scores)}")
    return 0


def _refusal_table(args) -> int:
    from .evaluation import write_refusal_table
    from .models import load_model
    from .paths import DATA_DIR, slug
    from .results import ResultsStore

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    out = Path(args.out) if args.out else DATA_DIR / "refusal" / slug(model.name)
    summary = write_refusal_table(model, out, args.max_new_tokens, ResultsStore.for_model(model),
                                  progress=not args.quiet)
    print(summary.to_string(index=False))
    print(f"wrote {out}/summary.csv, per_prompt.csv, manifest.json")
    return 0


def _refusal_report(args) -> int:
    from .evaluation import refusal_report

    root = Path(args.root)
    folders = sorted(p.parent for p in root.glob("*/summary.csv"))
    if not folders:
        raise FileNotFoundError(f"{root} holds no refusal tables (run `refusal-circuits refusal-table --model NAME`).")
    print(refusal_report(folders))
    return 0


def _organism(args) -> int:
    from .organism import train_organism

    summary = train_organism(Path(args.out) if args.out else None, progress=not args.quiet)
    print(summary.to_string(index=False))
    return 0


def _organism_check(args) -> int:
    import pandas as pd

    from .organism import compare_organisms, train_organism

    out = Path(args.out)
    reference = Path(args.reference) if args.reference else ORGANISM_DIR
    if out.resolve() == reference.resolve():
        raise ValueError("organism-check: --out must differ from --reference (it would overwrite the organism "
                         "it compares against).")
    if not args.skip_training:
        train_organism(out, progress=not args.quiet)
    table, weight_diff = compare_organisms(reference, out)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"largest adapter weight difference: {weight_diff:.3g}")
    ok = bool(table["within_noise"].all())
    print("reproduced within noise" if ok else "NOT reproduced within noise (rows with within_noise=False)")
    return 0 if ok else 1


def _screen(args) -> int:
    from .gate import load_pairs
    from .models import load_model
    from .screen import gate_line, screen

    load_pairs(args.pairs)  # a bad pair file is reported before the model loads
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    manifest = screen(model, Path(args.pairs), args.out, n_pairs=args.n_pairs, positions=args.positions, method=args.method,
                      top_k=args.top_k, bottom_k=args.bottom_k, seed=args.seed, ablation=not args.no_ablation, progress=not args.quiet,
                      log=lambda msg: print(msg, file=sys.stderr))
    import pandas as pd

    table = pd.read_csv(Path(args.out) / "interchange.csv")
    table["combined"] = table.necessity_pct + table.sufficiency_pct
    top = table.sort_values("combined", ascending=False).head(min(args.top_k, 10))
    print(f"wrote {args.out}/interchange.csv, head_dla.csv, pairs.csv, ablation.csv, manifest.json "
          f"({manifest['n_pairs']} pairs, positions={manifest['positions']}, {manifest['timings_s']['total']:.0f} s)")
    print(f"top {len(top)} heads by necessity % + sufficiency %: " + ", ".join(
        f"L{r.layer}H{r.head} ({r.necessity_pct:.1f} + {r.sufficiency_pct:.1f})" for r in top.itertuples()))
    print(gate_line(manifest))
    return 0


def _cipher(args) -> int:
    from .gate import load_pairs
    from .models import load_model
    from .screen import cipher_line, cipher_screen

    load_pairs(args.pairs)
    if not (Path(args.out) / "manifest.json").exists():
        raise ValueError(f"no screen in {args.out}: run `refusal-circuits screen --model {args.model} "
                         f"--pairs {args.pairs} --out {args.out}` first (the cipher stage tests that screen's gate).")
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    manifest = cipher_screen(model, Path(args.pairs), args.out, n_pairs=args.n_pairs, positions=args.positions, top_k=args.top_k,
                             max_new_tokens=args.max_new_tokens, n_random=args.n_random, seed=args.seed,
                             progress=not args.quiet, log=lambda msg: print(msg, file=sys.stderr))
    print(f"wrote {args.out}/cipher/interchange.csv, collapse.csv, rescue.csv, manifest.json "
          f"({manifest['n_pairs']} pairs, {manifest['timings_s']['total']:.0f} s)")
    print(cipher_line(manifest))
    return 0


def _at_least(low: int):
    """An argparse type: an integer >= ``low`` (argparse reports anything else in one line, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def _quiet_libraries() -> None:
    """No FutureWarnings or transformers chatter in the CLI's output (``--verbose`` keeps them)."""
    warnings.simplefilter("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("transformers", "transformer_lens", "peft", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="refusal-circuits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="show library warnings and logging")
    sub = parser.add_subparsers(dest="command", required=True)

    # the options every model command shares, declared once
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, Hugging Face id in the cache, or a folder")
    common.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps, or auto (several GPUs)")
    common.add_argument("--dtype", default="float32")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--threads", type=_at_least(1), default=None,
                        help="CPU threads for torch (default: $REFUSAL_THREADS, else the cores this process may "
                             "use); on a shared machine give it its share")
    seeded = argparse.ArgumentParser(add_help=False)
    seeded.add_argument("--seed", type=int, default=0)
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("refusal-rate", parents=[common],
                       help="greedy completions + substring refusal flags for a CSV of prompts")
    p.add_argument("--prompts", required=True, help="CSV file with one prompt per row")
    p.add_argument("--column", default="instruction")
    p.add_argument("--max-new-tokens", type=_at_least(1), default=64)
    p.add_argument("--batch-size", type=_at_least(1), default=16)
    p.add_argument("--out", default=None, help="output CSV (default: next to the prompts)")
    p.set_defaults(func=_refusal_rate)

    t = sub.add_parser("refusal-table", parents=[common],
                       help="refusal rates on the test split, the toy pairs and the safety pairs (greedy, substring "
                            "score, disclaimer-only refusals counted); writes data/refusal/<model>/")
    t.add_argument("--out", default=None, help="output folder (default data/refusal/<model>)")
    t.add_argument("--max-new-tokens", type=_at_least(1), default=32)
    t.set_defaults(func=_refusal_table)

    r = sub.add_parser("refusal-report", help="a markdown table of every saved refusal table (docs/refusal.md)")
    r.add_argument("--root", default="data/refusal", help="folder of refusal-table outputs")
    r.set_defaults(func=_refusal_report)

    o = sub.add_parser("organism", parents=[quiet], help="train and evaluate the refusal organism's LoRA adapter")
    o.add_argument("--out", default=None, help="output folder (default data/organism)")
    o.set_defaults(func=_organism)

    c = sub.add_parser("organism-check", parents=[quiet],
                       help="retrain the organism into a scratch folder and compare its evaluation and weights "
                            "with the committed one")
    c.add_argument("--out", default="build/organism-check", help="scratch folder for the retrained organism")
    c.add_argument("--reference", default=None, help="organism folder to compare with (default data/organism)")
    c.add_argument("--skip-training", action="store_true", help="only compare (--out already trained)")
    c.set_defaults(func=_organism_check)

    s = sub.add_parser("screen", parents=[common, seeded],
                       help="find the gate head: interchange of every head (NLL metric), head DLA and per-head "
                            "ablation on matched pairs; writes DIR/interchange.csv, head_dla.csv, manifest.json "
                            "and resumes when restarted")
    s.add_argument("--pairs", required=True, help="CSV with 'sensitive' and 'control' columns (optional pair_id, category)")
    s.add_argument("--out", required=True, help="output folder (one per model)")
    s.add_argument("--n-pairs", type=_at_least(1), default=None, help="pairs to use, in a seeded order (default: all)")
    s.add_argument("--positions", "--align", dest="positions", choices=POSITION_CHOICES, default="prompt",
                   help="which positions the interchange swaps: prompt (default: the prompts aligned from their "
                        "ends, target tokens never swapped), last (the last prompt position), paper (the paper's "
                        "code, alias start), answer (diagnostic: target-token positions swapped too, alias end)")
    s.add_argument("--method", choices=["exact", "attribution"], default="exact",
                   help="exact: batched interchange of every head; attribution: a gradient estimate for every "
                        "head, then the exact interchange of its top-k")
    s.add_argument("--top-k", type=_at_least(1), default=10,
                   help="heads the attribution screen confirms exactly (and heads listed before the gate line)")
    s.add_argument("--bottom-k", type=_at_least(0), default=5,
                   help="the attribution screen also confirms exactly its K most negative heads")
    s.add_argument("--no-ablation", action="store_true", help="skip the per-head directional ablation")
    s.set_defaults(func=_screen)

    c = sub.add_parser("cipher", parents=[common, seeded],
                       help="the cipher stage: the screen's gate and top heads on cipher-encoded sensitive "
                            "prompts (interchange collapse) and the rescue; writes DIR/cipher/")
    c.add_argument("--pairs", required=True, help="the screen's pair CSV")
    c.add_argument("--out", required=True, help="the model's screen folder (written by `screen`)")
    c.add_argument("--n-pairs", type=_at_least(1), default=None, help="pairs (default: the screen's)")
    c.add_argument("--positions", "--align", dest="positions", choices=POSITION_CHOICES, default=None,
                   help="default: the screen's")
    c.add_argument("--top-k", type=_at_least(1), default=5, help="heads tested: the gate and the screen's next best")
    c.add_argument("--max-new-tokens", type=_at_least(1), default=64, help="greedy tokens per rescue generation")
    c.add_argument("--n-random", type=_at_least(0), default=10, help="random heads for the rescue control")
    c.set_defaults(func=_cipher)

    args = parser.parse_args(argv)
    if not args.verbose:
        _quiet_libraries()
    try:
        if hasattr(args, "threads"):
            from .models import set_threads

            set_threads(args.threads)
        return args.func(args)
    except (ModelLoadError, ValueError, FileNotFoundError) as err:  # PairsError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
