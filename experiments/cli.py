"""The ``hypergrad`` command.

    hypergrad run [CONFIG] [--set key=value ...] [--preset NAME | --tiny] [--quiet]
    hypergrad run --resume RUN_DIR
    hypergrad list

``hypergrad run`` with no config runs ``configs/quickstart.yaml``. Several processes run
the same command with ``--coordinator HOST:PORT --num-processes N --process-id I`` (or the
``HYPERGRAD_*`` environment variables of :func:`hypergrad_jax.parallel.initialize`);
``--set run.data_parallel=true`` then splits inner minibatches over all their devices.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from experiments import config as cfg_lib
from experiments.harness import execute
from experiments.rundir import CheckpointError, RunDir

# experiment name -> module with ``Config`` (a dataclass) and ``build(config) -> Experiment``
EXPERIMENTS = {
    "quickstart": "experiments.quickstart.experiment",
    "fds_noise": "experiments.fds.noise",
    "fds_memory": "experiments.fds.memory",
    "fds_schedules": "experiments.fds.schedules",
    "nhgd_hyper_cleaning": "experiments.nhgd.hyper_cleaning",
    "nhgd_regularization": "experiments.nhgd.regularization",
    "nhgd_distillation": "experiments.nhgd.distillation",
    "hpm_synthetic": "experiments.hpm.synthetic",
    "hpm_digits": "experiments.hpm.digits",
    "resalign": "experiments.resalign.experiment",
}
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "quickstart.yaml"


def config_dirs() -> list[Path]:
    """Where configs are looked up: ./configs, then the project's configs/ (once, when they
    are the same folder)."""
    found = []
    for d in (Path.cwd() / "configs", ROOT / "configs"):
        if d.is_dir() and d.resolve() not in [f.resolve() for f in found]:
            found.append(d)
    return found


def find_config(name: str | None) -> Path:
    name = name or DEFAULT_CONFIG
    path = Path(name)
    if path.is_file():
        return path
    for folder in config_dirs():
        for candidate in (folder / name, folder / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    known = sorted(p.name for d in config_dirs() for p in d.glob("*.yaml"))
    raise cfg_lib.ConfigError(f"{name}: no such config file; known configs: {known}")


def load_config(data: dict, source: str):
    """Validates raw config data into the experiment's typed config."""
    sources = getattr(data, "sources", {})
    if "experiment" not in data:
        raise cfg_lib.ConfigError(
            f"{source}: experiment: missing required key; allowed: {sorted(EXPERIMENTS)}"
        )
    name = data["experiment"]
    if not isinstance(name, str) or name not in EXPERIMENTS:
        raise cfg_lib.ConfigError(
            cfg_lib.locate(
                f"experiment: unknown experiment {name!r}; allowed: {sorted(EXPERIMENTS)}",
                source,
                sources,
            )
        )
    module = importlib.import_module(EXPERIMENTS[name])
    return module, cfg_lib.from_dict(module.Config, data, source)


def build(module, config, data: dict, source: str):
    """``module.build(config)``: loads the data and checks what depends on it, so a
    ``ConfigError`` found there is located like any other (no run directory exists yet)."""
    try:
        return module.build(config)
    except cfg_lib.ConfigError as e:
        raise cfg_lib.ConfigError(
            cfg_lib.locate(str(e), source, getattr(data, "sources", {}))
        ) from e


def cmd_list(_args) -> int:
    width = max(map(len, EXPERIMENTS))
    print("experiments:")
    for name, module in EXPERIMENTS.items():
        doc = (importlib.import_module(module).__doc__ or "").strip().splitlines()[0]
        print(f"  {name:<{width}}  {doc}")
    print("configs:")
    for folder in config_dirs():
        for path in sorted(folder.glob("*.yaml")):
            try:
                experiment = cfg_lib.load_yaml(path).get("experiment", "?")
            except cfg_lib.ConfigError:
                experiment = "not valid YAML"
            print(f"  {path}  ({experiment})")
    return 0


def compile_cache(setting: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache for this process, so a second run of the
    same programs reads them back instead of compiling: ``--compile-cache DIR``, else
    ``$HYPERGRAD_COMPILE_CACHE``, else ``<hypergrad cache>/xla`` (``$HYPERGRAD_CACHE`` or
    ``~/.cache/hypergrad_jax``); ``off`` turns it off. A folder JAX was already given
    (``JAX_COMPILATION_CACHE_DIR``, e.g. by the tests) is kept. Programs that took at least
    0.2 s to compile are cached. Returns the folder in use, or None."""
    import jax

    from hypergrad_jax.data import default_cache_dir

    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    setting = setting or os.environ.get("HYPERGRAD_COMPILE_CACHE") or None
    if setting == "off":
        return None
    folder = setting or os.path.join(default_cache_dir(), "xla")
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return folder


def cmd_run(args) -> int:
    from hypergrad_jax import parallel  # first: before JAX starts its backend

    compile_cache(args.compile_cache)

    try:
        parallel.initialize(
            args.coordinator, args.num_processes, args.process_id, args.local_devices
        )
    except ValueError as e:  # a malformed flag or HYPERGRAD_* variable
        raise cfg_lib.ConfigError(str(e)) from e
    if args.resume:
        if args.config or args.set or args.preset or args.tiny:
            raise cfg_lib.ConfigError(
                "--resume: takes no config, --set or --preset: the run "
                "directory's config.yaml is used as it was"
            )
        rundir = RunDir.open(args.resume)
        source = str(rundir.path / "config.yaml")
        data = rundir.config()
        module, config = load_config(data, source)
        execute(build(module, config, data, source), rundir, quiet=args.quiet, resume=True)
        return 0
    path = find_config(args.config)
    preset = "tiny" if args.tiny else args.preset
    overrides = [cfg_lib.parse_override(s) for s in args.set]
    data = cfg_lib.resolve(cfg_lib.load_yaml(path), str(path), preset, overrides)
    if args.out is not None:
        cfg_lib.set_dotted(data, "run.out_dir", args.out, "--out")
    module, config = load_config(data, str(path))
    experiment = build(module, config, data, str(path))  # before the run directory exists
    rundir = RunDir.create(config.run.out_dir, config.experiment, cfg_lib.to_dict(config))
    if not args.quiet and rundir.primary:
        print(f"{config.experiment}: {path} -> {rundir.path}")
    execute(experiment, rundir, quiet=args.quiet, resume=False)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hypergrad", description="hypergrad_jax experiments")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment from a YAML config")
    run.add_argument("config", nargs="?", help=f"config file or name (default {DEFAULT_CONFIG})")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (dotted key; YAML value)",
    )
    run.add_argument("--preset", help="apply a preset defined in the config (e.g. tiny)")
    run.add_argument("--tiny", action="store_true", help="same as --preset tiny")
    run.add_argument("--out", help="parent folder of the run directory (run.out_dir)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "--compile-cache",
        metavar="DIR|off",
        help="persistent compilation cache folder, or off (default: $HYPERGRAD_COMPILE_CACHE, "
        "else ~/.cache/hypergrad_jax/xla)",
    )
    dist = run.add_argument_group("multi-process (jax.distributed; default: HYPERGRAD_* env)")
    dist.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    dist.add_argument("--num-processes", type=int, help="number of processes")
    dist.add_argument("--process-id", type=int, help="this process's index")
    dist.add_argument("--local-devices", type=int, help="CPU devices per process")
    sub.add_parser("list", help="list experiments and configs")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return {"run": cmd_run, "list": cmd_list}[args.command](args)
    except (cfg_lib.ConfigError, FileNotFoundError, CheckpointError) as e:
        print(f"hypergrad: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `hypergrad list | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
