"""The ``slimkit`` command line: compress, train, eval, profile, recipes, stages, models, report, decode, export.

The CLI is a full spelling of the recipe: flags override its top-level keys and
``--set PATH=VALUE`` any field. Every deliberate error (bad recipe or flag, unknown name,
missing data, corrupt file, a run directory that would mix two runs) is printed as one
line on stderr with exit code 2; an interrupted run says how to resume. Bare ``slimkit``
prints this help.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from slimkit.exceptions import ConfigError, SlimkitError


class UsageError(ConfigError):
    """A command line argparse rejects; :func:`main` prints it as one line with the --help to read."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``slimkit compress: error: ...; see slimkit compress --help``."""

    def error(self, message: str):  # argparse prints usage + message and exits 2; we raise instead
        raise UsageError(message)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--input-shape {text!r}: must be comma-separated integers such as 1,3,224,224") from None
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise ConfigError(f"--input-shape {text!r}: needs at least 2 positive sizes (batch,channels[,height,width])")
    return shape


MODEL_SPELLINGS = "zoo name, torchvision:NAME, timm:NAME, path/to/file.py:callable or package.module:callable"


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help=f"model source (overrides the recipe): {MODEL_SPELLINGS}")
    parser.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                        help="keyword argument for the model builder (repeatable, VALUE read as YAML; replaces "
                             "the recipe's model_args)")
    parser.add_argument("--weights", metavar="FILE",
                        help="state dict or checkpoint to start from (the baseline is then not trained)")
    parser.add_argument("--data", help="dataset: digits, mnist, fashion-mnist, cifar10, cifar100, imagefolder:PATH")
    parser.add_argument("--data-dir", help="where dataset files live (default ./data)")
    parser.add_argument("--download", action="store_true", default=None, help="download the dataset if missing")
    parser.add_argument("--image-size", type=int, help="resize images to this size (e.g. 224)")
    parser.add_argument("--epochs", type=int, help="baseline training epochs only (train.epochs); fine-tunes: "
                                                   "--set stages[N].finetune.epochs=E")
    parser.add_argument("--seed", type=int, help="seed of training and data order (train.seed)")
    parser.add_argument("--set", dest="sets", action="extend", nargs="+", default=[], metavar="PATH=VALUE",
                        help="set any recipe field, e.g. --set stages[0].finetune.epochs=1 train.batch_size=32 "
                             "(VALUE read as YAML; applied after the other flags)")
    parser.add_argument("--out", help="run directory (default runs/<recipe name>); must be new or empty unless "
                                      "--resume or --overwrite")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out (refused when the recipe or flags differ from the recorded)")
    parser.add_argument("--overwrite", action="store_true", help="clear what an earlier run left in --out, then run")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model, trace it and check every stage against it, without training")
    parser.add_argument("--device", help="where training runs: cpu, cuda or cuda:N (default: the GPU if any); "
                                         "measurements always run on the CPU")
    parser.add_argument("--threads", type=_positive, help="torch CPU threads for training (recipe threads)")
    parser.add_argument("--latency-threads", type=_positive,
                        help="torch CPU threads while timing latency (recipe latency_threads, default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from slimkit import __version__
    from slimkit.measure.latency import DEFAULT_LATENCY_THREADS

    parser = _Parser(prog="slimkit", description="Make CNNs small and fast, and measure it.",
                     epilog="Start with `slimkit compress` (the default recipe on the embedded digits data) or "
                            "`slimkit compress --model mynet.py:MyNet --data imagefolder:DIR --recipe NAME`; "
                            "`slimkit COMMAND --help` tells more.")
    parser.add_argument("--version", action="version", version=f"slimkit {__version__}",
                        help="print slimkit's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("compress", help="run a compression recipe (default: deep-compression on digits)")
    p.add_argument("--recipe", help="built-in recipe name or path to a YAML file")
    _add_run_flags(p)

    p = sub.add_parser("train", help="train a model and save it (a recipe without stages)")
    _add_run_flags(p)
    p.add_argument("--lr", type=float, help="learning rate (train.lr, default 0.05)")
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], help="optimizer (train.optimizer, default sgd)")
    p.add_argument("--batch-size", type=_positive, help="batch size per process (train.batch_size, default 64)")

    p = sub.add_parser("eval", help="accuracy of a saved model (model.pt, .slim) on the data it was trained on")
    p.add_argument("model_path", help="a model file slimkit wrote (.pt or .slim), or a state dict with --model")
    p.add_argument("--data", help="dataset (default: the one the model recorded)")
    p.add_argument("--data-dir", help="where dataset files live (default: the recorded one, else ./data)")
    p.add_argument("--image-size", type=int, help="resize images (default: the recorded size)")
    p.add_argument("--model", help=f"model source for a plain state dict: {MODEL_SPELLINGS}")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="keyword argument for --model")

    p = sub.add_parser("profile", help="params, MACs, bytes and latency of a model")
    p.add_argument("model_path", nargs="?", help="a model file slimkit wrote (.pt or .slim)")
    p.add_argument("--model", help=f"a model file, or a model source: {MODEL_SPELLINGS}")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="keyword argument for --model")
    p.add_argument("--input-shape", help="comma-separated, e.g. 1,3,224,224 (default: a saved model's recorded "
                                         "input, else 1,3,224,224)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of a --model source (default 1000)")
    p.add_argument("--layers", action="store_true", help="per-layer table")
    p.add_argument("--no-latency", action="store_true", help="count only; do not time forwards")
    p.add_argument("--threads", type=_positive, default=DEFAULT_LATENCY_THREADS,
                   help=f"torch CPU threads while timing (default {DEFAULT_LATENCY_THREADS}, as in compress)")
    p.add_argument("--deadline-ms", type=float, help="real-time view: p50/p99/max, jitter, misses of this deadline")
    p.add_argument("--fps", type=float, help="real-time view at this frame rate (deadline 1000/FPS ms)")
    p.add_argument("--engine", default="eager", help="real-time view engine: eager, onnxruntime, onnxruntime-int8")
    p.add_argument("--runs", type=int, default=500, help="batch-1 runs of the real-time view")
    p.add_argument("--sram-bytes", type=int, help="on-chip SRAM assumed by the energy estimate (default 512 KiB)")

    sub.add_parser("recipes", help="list built-in recipes")
    p = sub.add_parser("stages", help="list the stage kinds a recipe may use, with their settings and defaults")
    p.add_argument("kinds", nargs="*", metavar="KIND", help="only these stage kinds (e.g. magnitude share)")
    p = sub.add_parser("models", help="list zoo models with their parameters and the input they expect")
    p.add_argument("pattern", nargs="?", default="*", help="glob over the names, e.g. 'resnet*'")

    p = sub.add_parser("report", help="print the stage table of a run directory")
    p.add_argument("run_dir", help="a directory `slimkit compress` wrote (holds report.json)")

    p = sub.add_parser("decode", help="decode a .slim container into a model file")
    p.add_argument("slim_file", help="a .slim file slimkit wrote")
    p.add_argument("-o", "--output", help="model file to write (default: FILE's name with .decoded.pt)")

    p = sub.add_parser("export", help="write a deployable file (ONNX, int8 ONNX, .slim, ExecuTorch) of a model")
    p.add_argument("target", metavar="MODEL|RUN_DIR", help="a model file slimkit wrote, or a run directory "
                                                           "(its final model.pt)")
    p.add_argument("--format", required=True, metavar="FORMAT",
                   help="onnx (fp32), int8-onnx (the model's int8 grids, else calibrated PTQ), slim, executorch, "
                        "executorch-int8 (XNNPACK; pip install 'slimkit[executorch]')")
    p.add_argument("-o", "--output", help="file to write, atomically (default: beside the model, e.g. "
                                          "model.int8.onnx); a directory puts it there")
    p.add_argument("--check", action="store_true", help="run the written file in its engine on the recorded data's "
                                                        "test split: accuracy and agreement with the PyTorch model")
    p.add_argument("--data", help="dataset for calibration and --check (default: the one the model recorded)")
    p.add_argument("--data-dir", help="where dataset files live (default: the recorded one, else ./data)")
    p.add_argument("--image-size", type=int, help="resize images (default: the recorded size)")

    p = sub.add_parser("search", help="per-layer settings across techniques that meet a budget (size, MACs, p99 "
                                      "latency, energy) with the least accuracy lost")
    p.add_argument("--budget", required=True, help="METRIC=VALUE or METRIC=FACTORx (of the baseline's measured "
                                                   "value): latency_p99_ms, size_bytes, macs, energy_mj")
    p.add_argument("--model", default="lenet5", help="zoo model name")
    p.add_argument("--data", default="digits", help="dataset (default digits)")
    p.add_argument("--data-dir", default="data", help="where dataset files live (default ./data)")
    p.add_argument("--baseline", help="saved model to start from (default: train one for --epochs)")
    p.add_argument("--epochs", type=int, default=4, help="baseline training epochs")
    p.add_argument("--engine", default="onnxruntime", help="where latency is measured: eager, onnxruntime, "
                                                           "onnxruntime-int8")
    p.add_argument("--techniques", help="comma-separated among channels,rank,bits (default: channels,rank; "
                                        "+bits for size and energy budgets)")
    p.add_argument("--strategy", default="both", choices=["both", "greedy", "evolution"],
                   help="greedy (NetAdapt-style), evolution, or both (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search (default 0)")
    p.add_argument("--trial-epochs", type=int, default=1, help="fine-tune epochs of each candidate")
    p.add_argument("--final-epochs", type=int, default=3, help="fine-tune epochs of the winner (recipe.yaml)")
    p.add_argument("--finalists", type=int, default=3, help="trials within the target fine-tuned again before the "
                                                            "choice (default 3, plus the best uniform one)")
    p.add_argument("--finalist-seeds", type=int, default=3, help="fine-tunes of each finalist, each with its own "
                                                                 "seed and validation draw (default 3)")
    p.add_argument("--population", type=int, default=16, help="evolutionary search population")
    p.add_argument("--generations", type=int, default=8, help="evolutionary search generations")
    p.add_argument("--runner", default="auto", choices=["auto", "ray", "sequential"],
                   help="trials through Ray Tune (auto: when ray is installed) or in this process")
    p.add_argument("--ray-address", help="Ray cluster to run trials on (default: a local Ray instance)")
    p.add_argument("--threads", type=int, default=1, help="engine threads when timing (default 1)")
    p.add_argument("--round-to", type=int, help="channel knobs keep multiples of this many channels (default: 8 on "
                                                "onnxruntime engines, whose x86 kernels run 8-channel blocks; 1 eager)")
    p.add_argument("--sram-bytes", type=int, help="on-chip SRAM of the energy estimate (default 512 KiB)")
    p.add_argument("--out", help="search directory (default runs/search-<model>)")
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    return {"model": args.model, "data": args.data, "data_dir": args.data_dir, "download": args.download,
            "image_size": args.image_size, "epochs": args.epochs, "threads": args.threads,
            "weights": args.weights, "model_args": _model_args(args) or None}


def _model_args(args: argparse.Namespace) -> dict:
    from slimkit.models.saved import parse_model_args

    return parse_model_args(getattr(args, "model_arg", None))


def cmd_compress(args: argparse.Namespace) -> int:
    from slimkit import distributed
    from slimkit.pipeline import run_recipe
    from slimkit.recipe import load_recipe
    from slimkit.report import format_stage_table

    recipe = load_recipe(args.recipe, overrides=_run_overrides(args), sets=args.sets)
    out = Path(args.out or f"runs/{recipe.name}")
    if args.dry_run:
        return _dry_run(recipe, out, args)
    with distributed.process_group_from_env():
        report = _logged(out, lambda: run_recipe(recipe, out, resume=args.resume, overwrite=args.overwrite,
                                                 progress=not args.no_progress, device=args.device))
        main = distributed.is_main()
    if main:
        from slimkit.deploy.run import RunDeployables

        print(format_stage_table(report["stages"]))
        deployables = RunDeployables.from_dict(report["deployables"])
        files = ", ".join(f.name for f in deployables.files)
        print(f"\nrun directory: {out}  (report.md, report.json, accuracy_vs_size.png, {files})")
        print(deployables.ship_line())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from slimkit import distributed
    from slimkit.pipeline import run_recipe
    from slimkit.recipe import parse_recipe

    train = {k: v for k, v in {"lr": args.lr, "optimizer": args.optimizer, "batch_size": args.batch_size}.items()
             if v is not None}
    recipe = parse_recipe({"name": "train", "description": "train only", "train": train}, "cli",
                          overrides=_run_overrides(args), sets=args.sets)
    out = Path(args.out or f"runs/train-{_slug(recipe.model)}")
    if args.dry_run:
        return _dry_run(recipe, out, args)
    with distributed.process_group_from_env():
        report = _logged(out, lambda: run_recipe(recipe, out, resume=args.resume, overwrite=args.overwrite,
                                                 progress=not args.no_progress, device=args.device))
        main = distributed.is_main()
    if main:
        row = report["stages"][0]
        print(f"{recipe.model} on {recipe.data}: {row['accuracy']:.2f}% test accuracy; saved {out / 'model.pt'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from slimkit.data import load_data
    from slimkit.models.saved import model_data, open_model
    from slimkit.train import evaluate

    if args.model:  # a plain state dict: the architecture comes from --model, its shape from the data
        data = load_data(args.data or "digits", data_dir=args.data_dir, image_size=args.image_size)
        model = open_model(args.model_path, args.model, _model_args(args), data.num_classes, data.in_channels)
    else:
        model = open_model(args.model_path)
    data = model_data(model, args.model_path, args.data, args.data_dir, args.image_size)
    print(f"{args.model_path}: {evaluate(model, data.test):.2f}% on {data.name} test ({len(data.test)} images)")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import torch

    from slimkit.measure import format_layer_table, format_summary, profile

    target = args.model_path or args.model
    if target is None or (args.model_path and args.model):
        raise ConfigError("profile: give one model, a saved file (slimkit profile runs/NAME/model.pt) or "
                          "--model SOURCE")
    if Path(target).is_file() or target.endswith((".pt", ".pth", ".slim")):
        from slimkit.manifest import data_spec_of
        from slimkit.models import arch_of
        from slimkit.models.saved import open_model

        model = open_model(target)
        recorded = (data_spec_of(model) or {}).get("input_shape")  # files from before the data spec: 224 px
        recorded = recorded or [(arch_of(model) or {}).get("in_channels", 3), 224, 224]
        shape = _input_shape(args.input_shape or ",".join(map(str, [1, *recorded])))
    else:
        from slimkit.models import create_model

        shape = _input_shape(args.input_shape or "1,3,224,224")
        model = create_model(target, num_classes=args.num_classes, in_channels=shape[1], **_model_args(args))
    from slimkit.measure.realtime import deadline_from, realtime_profile

    deadline = deadline_from(args.deadline_ms, args.fps)
    result = profile(model, torch.zeros(shape), latency=not args.no_latency, threads=args.threads,
                     sram_bytes=args.sram_bytes)
    if args.layers:
        print(format_layer_table(result))
        print()
    print(format_summary(result))
    if deadline is not None:
        stats = realtime_profile(model, torch.zeros(shape), args.engine, args.runs, deadline, args.threads or 1)
        print(stats.summary())
    return 0


def _logged(out: Path, run):
    """``run()``; a deliberate error or Ctrl-C after the run started is also written to its run.log."""
    from slimkit.rundir import LOG_FILE, RunDirError, RunLog

    try:
        return run()
    except (SlimkitError, KeyboardInterrupt) as err:
        if not isinstance(err, RunDirError) and (out / LOG_FILE).is_file():
            RunLog(out)(f"error: {err}" if isinstance(err, SlimkitError) else "interrupted (continue with --resume)")
        raise


def _run_overrides(args: argparse.Namespace) -> dict:
    """The recipe keys ``compress`` and ``train`` flags override (``--set`` comes on top)."""
    return {**_overrides(args), "seed": args.seed, "latency_threads": args.latency_threads}


def _slug(text: str) -> str:
    """A model source as a directory name: ``mynet.py:MyNet`` -> ``mynet.py-MyNet``."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(text).name if "/" in text else text).strip("-") or "model"


def _dry_run(recipe, out: Path, args: argparse.Namespace) -> int:
    from slimkit import rundir
    from slimkit.dryrun import dry_run
    from slimkit.train import resolve_device

    resolve_device(args.device)
    rundir.check(out, recipe.to_dict(), resume=args.resume, overwrite=args.overwrite)
    dry_run(recipe)
    print(f"dry run: every stage fits; `slimkit {args.command}` without --dry-run writes {out}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from slimkit.recipe import list_recipes

    for name, description in list_recipes():
        print(f"{name:28s} {description}")
    return 0


def cmd_stages(args: argparse.Namespace) -> int:
    from slimkit.catalog import describe_stage
    from slimkit.stages import STAGES

    kinds = args.kinds or STAGES.names()
    print("\n\n".join(describe_stage(STAGES.get(kind)) for kind in kinds))
    print("\nIn a recipe: stages: [{name: NAME, KIND: {FIELD: VALUE, ...}, finetune: {epochs: E, ...}}]; "
          "from the command line: --set stages[N].KIND.FIELD=VALUE")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from slimkit.catalog import describe_models
    from slimkit.models import list_models

    names = list_models(args.pattern)
    if not names:
        raise ConfigError(f"no zoo model matches {args.pattern!r}; `slimkit models` lists them all")
    print(describe_models(names))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from slimkit.report import format_stage_table, read_report, write_report

    report = read_report(args.run_dir)
    write_report(args.run_dir, report)
    print(format_stage_table(report["stages"]))
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from slimkit.encode import load
    from slimkit.manifest import save_model
    from slimkit.models.saved import decoded_path

    output = args.output or decoded_path(args.slim_file)
    model = load(args.slim_file)  # keeps the recorded source and data spec
    save_model(model, output)
    print(f"decoded {args.slim_file} -> {output}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from slimkit.deploy.command import run_export

    outcome = run_export(args.target, args.format, args.output, args.check, args.data, args.data_dir,
                         args.image_size)
    print("\n".join(outcome.lines()))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from slimkit.search import search

    cfg = {"model": args.model, "data": args.data, "data_dir": args.data_dir, "baseline": args.baseline,
           "epochs": args.epochs, "budget": args.budget, "engine": args.engine, "strategy": args.strategy,
           "seed": args.seed, "trial_epochs": args.trial_epochs, "final_epochs": args.final_epochs,
           "population": args.population, "generations": args.generations, "runner": args.runner,
           "ray_address": args.ray_address, "threads": args.threads, "sram_bytes": args.sram_bytes,
           "round_to": args.round_to, "finalists": args.finalists, "finalist_seeds": args.finalist_seeds}
    if args.techniques:
        cfg["techniques"] = tuple(t.strip() for t in args.techniques.split(",") if t.strip())
    out = Path(args.out or f"runs/search-{args.model}")
    result = search(cfg, out)
    metric = result["budget"]["metric"]
    print(f"\nbudget {metric} <= {result['budget']['value']:.6g}: baseline {result['baseline']['accuracy']:.2f}% at "
          f"{result['baseline'][metric]:.6g}, chosen {result['chosen']['accuracy']:.2f}% at "
          f"{result['chosen'][metric]:.6g} ({'meets' if result['chosen']['meets_budget'] else 'MISSES'} it)")
    print(f"search directory: {out}  (search.json, recipe.yaml, pareto.png, report.html; "
          f"reproduce: slimkit compress --recipe {out / 'recipe.yaml'})")
    return 0


COMMANDS = {"stages": cmd_stages,
            "compress": cmd_compress, "train": cmd_train, "eval": cmd_eval, "profile": cmd_profile,
            "recipes": cmd_recipes, "models": cmd_models, "report": cmd_report, "decode": cmd_decode,
            "search": cmd_search, "export": cmd_export}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), "slimkit")
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        command = args.command
        return COMMANDS[command](args)
    except SlimkitError as err:
        prefix = "slimkit" if command == "slimkit" else f"slimkit {command}"
        hint = f"; see {prefix} --help" if isinstance(err, UsageError) else ""
        print(f"{prefix}: error: {err}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"slimkit {command}: interrupted; run it again with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
