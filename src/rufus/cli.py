"""`rufus <command> --config cfg.yaml key=value ...`: parse, load the config, call the trainer.

A thin shell over the Python API: every command is a function taking its config dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from rufus.commands import COMMANDS, load_command

_load = load_command  # command -> (config class, function)


def build_playground_base(cfg) -> None:
    """Build the playground base model first when the config names `builtin:playground-base`
    anywhere (the model loader only finds it once built). The pipeline builds its own."""
    from rufus.models.tiny import PLAYGROUND_BASE

    def names(value) -> bool:
        if dataclasses.is_dataclass(value):
            return any(names(getattr(value, f.name)) for f in dataclasses.fields(value))
        if isinstance(value, dict):
            return any(names(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return any(names(v) for v in value)
        return value == PLAYGROUND_BASE

    if names(cfg):
        from rufus.playground.base import base_model_path

        base_model_path()  # at once when cached; else it logs that it builds, then builds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rufus",
        description="Train language models from human feedback: SFT, reward models, RL.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (_, _, _, desc) in COMMANDS.items():
        p = sub.add_parser(
            name, help=desc, description=desc, add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        p.add_argument("-h", "--help", action="store_true", help="list every config key and exit")
        p.add_argument("--config", "-c", help="YAML config file (key=value overrides win)")
        p.add_argument(
            "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lr=1e-5 data.train=x.jsonl"
        )
    from rufus.classic import ALGOS

    desc = (
        "classic RL on gymnasium: tabular Q-learning / SARSA / TD(0) vs MC, DQN, REINFORCE, A2C, PPO, TRPO, DDPG, TD3"
    )
    p = sub.add_parser(
        "classic",
        help=desc,
        description=desc,
        add_help=False,
        usage=f"rufus classic {{{','.join(ALGOS)}}} [--config cfg.yaml] [key=value ...]",
    )
    p.add_argument("algo", nargs="?", choices=list(ALGOS), metavar="algo", help="one of: " + ", ".join(ALGOS))
    p.add_argument("-h", "--help", action="store_true", help="list every config key and exit")
    p.add_argument("--config", "-c", help="YAML config file (key=value overrides win)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. env=CartPole-v1 seed=1")
    desc = "look at a data file: its format, rows, rejected rows with their lines, lengths in tokens, examples"
    p = sub.add_parser(
        "data",
        help=desc,
        description=desc,
        add_help=False,
        usage="rufus data inspect FILE [key=value ...]",
    )
    p.add_argument("action", nargs="?", choices=["inspect"], metavar="inspect", help="the one action: inspect")
    p.add_argument("-h", "--help", action="store_true", help="list every config key and exit")
    p.add_argument("overrides", nargs="*", metavar="FILE key=value", help="the file, then e.g. tokenizer=gpt2")
    from rufus.studio.commands import add_parser as add_studio

    add_studio(sub)
    return parser


def run_data(args, parser) -> int:
    """`rufus data inspect FILE key=value ...`: print the report of `rufus.data.inspect`."""
    from rufus.config import ConfigError, config_help, load_config
    from rufus.data.errors import DataError
    from rufus.data.inspect import InspectConfig, format_report, inspect_data

    sub = parser._subparsers._group_actions[0].choices["data"]  # noqa: SLF001
    if args.help or not args.action:
        print(sub.format_help())
        if args.help:
            print(config_help(InspectConfig))
        return 0 if args.help else 2
    overrides = list(args.overrides)
    if overrides and "=" not in overrides[0]:
        overrides[0] = f"file={overrides[0]}"
    try:
        report = inspect_data(load_config(InspectConfig, None, overrides))
    except (ConfigError, DataError) as e:
        print(f"rufus data inspect: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from rufus import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 2
    if args.command == "data":
        return run_data(args, parser)
    if args.command in ("studio", "leaderboard"):
        from rufus.studio.commands import run as run_studio

        return run_studio(args, parser)
    from rufus.config import ConfigError, config_help, load_config

    if args.command == "classic":
        from rufus.classic import load as load_classic

        if not args.algo:
            sub = parser._subparsers._group_actions[0].choices["classic"]  # noqa: SLF001
            print(sub.format_help())
            return 0 if args.help else 2

        cfg_cls, fn = load_classic(args.algo)
    else:
        cfg_cls, fn = load_command(args.command)
    if args.help:
        sub = parser._subparsers._group_actions[0].choices[args.command]  # noqa: SLF001
        print(sub.format_help())
        print(config_help(cfg_cls))
        return 0
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    from rufus.data.errors import DataError
    from rufus.rewards.sources import RewardError

    try:
        cfg = load_config(cfg_cls, args.config, args.overrides)
        if args.command not in ("pipeline", "demo"):  # the pipeline builds its base model as a stage
            build_playground_base(cfg)
        result = fn(cfg)
    except (ConfigError, DataError, RewardError) as e:
        print(f"rufus {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a pipeline waiting for people's labels: not an error, a pause
        from rufus.pipeline import PENDING_EXIT, LabelsPending

        if not isinstance(e, LabelsPending):
            raise
        print(f"\nrufus {args.command}: {e}", flush=True)
        return PENDING_EXIT
    print_summary(args.command if args.command != "classic" else f"classic {args.algo}", result)
    return 0


def print_summary(command: str, result) -> None:
    """The last logged values and where the outputs are, as a small table."""
    if hasattr(result, "summary"):  # the pipeline prints its own summary table
        return
    if isinstance(result, dict):  # an evaluation: its metrics
        print(f"rufus {command}:")
        for key, value in result.items():
            if isinstance(value, (list, dict)):
                continue
            print(f"  {key:<14} {value:.4g}" if isinstance(value, float) else f"  {key:<14} {value}")
        return
    rows = getattr(result, "metrics", None) or []
    if hasattr(result, "episodes"):  # a classic agent: episodes, the recent mean return, its extras
        print(
            f"\nrufus {command}: {len(result.episodes)} episodes; mean return of the last 20: "
            f"{result.mean_return(20):.4g}"
        )
        for key, value in result.extra.items():
            if isinstance(value, (int, float)):
                print(f"  {key:<22} {value:.4g}")
        print(f"rufus {command}: outputs in {result.output_dir} (metrics.jsonl, agent.pt, plots/episodic_return.png)")
        return
    if rows:
        last = {}
        for row in rows:  # the latest value of every metric, eval ones included
            last.update(row)
        width = max(len(k) for k in last)
        print(f"\nrufus {command}: finished at step {last.get('step')}")
        for key, value in last.items():
            if key != "step":
                print(f"  {key:<{width}}  {value:.4g}" if isinstance(value, float) else f"  {key:<{width}}  {value}")
    print(
        f"rufus {command}: outputs in {getattr(result, 'output_dir', '')}"
        + (f"; final model in {result.final_dir}" if getattr(result, "final_dir", None) else "")
    )


if __name__ == "__main__":
    sys.exit(main())
