"""Does LocoProp find its own γ? The hypergradient benchmark of the README (SPEC §12).

With the protocol of ``locoprop compare`` (reference autoencoder on mnist5k,
batch 250, 30 s of training per run, selection on the validation split with
the tuning seed, fresh seeds for the final runs), starting γ at
``--starts`` times the tuned value (the compare preset):

1. selection: each β of ``--betas`` trains from every start with the tuning
   seed; the β whose worst start has the lowest validation loss is chosen
   (one β for all starts: a user does not know on which side of the tuned γ
   they start);
2. final runs, over ``--seeds``: the tuned γ with β = 0 (the reference),
   each start with β = 0 (what adaptation has to recover) and with the chosen
   β, all at equal training time; the adapted runs again at equal steps
   (the reference's step count). Every run is a ``locoprop train`` run
   directory under ``--out`` (the same command resumes; finished runs are
   read back).

It prints the table of the README: training and validation loss, mean and
95% t interval over seeds, steps, and the final γ per unit.

    python examples/hypergrad_benchmark.py --out runs/hypergrad
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics

from analysis.stats import mean_interval
from sweeps.commands.presets import COMPARE_DEFAULTS, PRESETS
from sweeps.runner import run_directory
from sweeps.runner.config import RunConfig, run_dir_name
from sweeps.runner.train import train

WORKLOAD, DATA = "autoencoder", "mnist5k"


def run(base: RunConfig, out: pathlib.Path, label: str, **changes) -> dict:
    """One run (resumed or read back if it exists); its summary with the label and the final γ."""
    hparams = {**base.hparams, **changes.pop("hparams", {})}
    config = dataclasses.replace(base, hparams=hparams, **changes)
    config.out = str(out / run_dir_name(config))
    summary_path = pathlib.Path(config.out) / run_directory.SUMMARY
    if summary_path.exists() and run_directory.read_json(summary_path).get("status") in ("ok", "diverged"):
        summary = run_directory.read_json(summary_path)
    else:
        summary = train(config, resume=True, progress=False).summary
    history = run_directory.read_history(pathlib.Path(config.out) / run_directory.METRICS)
    gammas = {key: value for key, value in history[-1].items() if key.startswith("gamma/")}
    print(f"{label:34s} seed {config.seed}: {summary['steps']:4d} steps, train {summary['final_train_loss']:.2f}, "
          f"valid {summary['final_valid_loss']:.2f}, {summary['train_seconds']:.1f} s", flush=True)  # fmt: skip
    return {**summary, "label": label, "gammas": gammas}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/hypergrad")
    parser.add_argument("--optimizer", default="locoprop-m", choices=["locoprop-m", "locoprop-s"])
    parser.add_argument("--hypergrad", default="implicit", choices=["implicit", "unrolled"])
    parser.add_argument("--betas", default="0.01,0.03,0.1,0.3,1")
    parser.add_argument("--starts", default="0.1,10")
    parser.add_argument("--rule", default="plain", choices=["plain", "normalized"], help="γ's update rule")
    parser.add_argument("--adapted-only", action="store_true",
                        help="final runs: the tuned γ and the adapted runs at equal time only")  # fmt: skip
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--tune-seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, default=COMPARE_DEFAULTS[WORKLOAD]["time_budget"])
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    betas = [float(b) for b in args.betas.split(",")]
    starts = [float(s) for s in args.starts.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    tuned = PRESETS[(WORKLOAD, args.optimizer)]
    gamma = tuned["activation_lr"]
    batch_size = COMPARE_DEFAULTS[WORKLOAD]["batch_size"]
    base = RunConfig(workload=WORKLOAD, data=DATA, optimizer=args.optimizer, hparams=dict(tuned),
                     batch_size=batch_size, time_budget=args.time_budget, device="cpu")  # fmt: skip

    def adapted(start: float, beta: float) -> dict:
        return {"activation_lr": start * gamma, "hypergrad_lr": beta, "hypergrad": args.hypergrad,
                "hypergrad_rule": args.rule}  # fmt: skip

    print(f"selection (seed {args.tune_seed}): β in {betas}, γ starts {[s * gamma for s in starts]}", flush=True)
    worst = {}
    for beta in betas:
        losses = [run(base, out / "selection", f"β {beta:g} from {start:g}×γ", seed=args.tune_seed,
                      hparams=adapted(start, beta))["final_valid_loss"] for start in starts]  # fmt: skip
        worst[beta] = max(losses)
    beta = min(worst, key=worst.get)
    print(f"chosen β = {beta:g} (worst-start validation loss {worst[beta]:.2f})", flush=True)

    finals: dict[str, list[dict]] = {}
    for seed in seeds:
        reference = run(base, out / "final", f"tuned γ {gamma:g}", seed=seed, hparams={"hypergrad_lr": 0.0})
        finals.setdefault(f"tuned γ = {gamma:g}, β = 0", []).append(reference)
        for start in starts:
            if not args.adapted_only:
                finals.setdefault(f"γ₀ = {start:g}× tuned, β = 0", []).append(
                    run(base, out / "final", f"fixed {start:g}×γ", seed=seed, hparams={"activation_lr": start * gamma})
                )
            finals.setdefault(f"γ₀ = {start:g}× tuned, β = {beta:g}, equal time", []).append(
                run(base, out / "final", f"adapted from {start:g}×γ", seed=seed, hparams=adapted(start, beta))
            )
            if args.adapted_only:
                continue
            finals.setdefault(f"γ₀ = {start:g}× tuned, β = {beta:g}, equal steps", []).append(
                run(
                    base,
                    out / "final",
                    f"adapted from {start:g}×γ, equal steps",
                    seed=seed,
                    hparams=adapted(start, beta),
                    time_budget=None,
                    steps=reference["steps"],
                )
            )

    print(f"\n{args.optimizer}, hypergrad {args.hypergrad}, β chosen on seed {args.tune_seed}: {beta:g}; "
          f"final runs over seeds {seeds}; mean (95% t interval)\n")  # fmt: skip
    print("| start | train loss | valid loss | steps | training s | final γ per unit (seed 1) |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for label, runs in finals.items():
        train_loss = mean_interval([r["final_train_loss"] for r in runs])
        valid_loss = mean_interval([r["final_valid_loss"] for r in runs])
        rows[label] = {"train": train_loss.estimate, "valid": valid_loss.estimate}
        gammas = ", ".join(f"{v:.3g}" for v in runs[0]["gammas"].values()) or "–"
        print(f"| {label} | {train_loss.estimate:.2f} ({train_loss.low:.2f} to {train_loss.high:.2f}) | "
              f"{valid_loss.estimate:.2f} ({valid_loss.low:.2f} to {valid_loss.high:.2f}) | "
              f"{statistics.mean(r['steps'] for r in runs):.0f} | "
              f"{statistics.mean(r['train_seconds'] for r in runs):.1f} | {gammas} |")  # fmt: skip
    (out / "hypergrad_benchmark.json").write_text(json.dumps({"beta": beta, "worst": worst, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
