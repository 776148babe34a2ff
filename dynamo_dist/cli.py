"""``dynamo-dist`` command line: parse arguments, connect, call one library function.

Subcommands: population, add-models, meta, embed, sweep, analyze, seeds, run (whole pipeline), repair, ui, recipes.
Configs are pipeline YAML files (see configs/); ``--recipe NAME`` uses a built-in recipe,
``--set key=value`` overrides dotted fields (``--set meta.steps=100``).
"""

from __future__ import annotations

import argparse
import sys
import time

import yaml

from . import config as config_mod


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise ValueError(f"--set expects key=value, got {p!r}")
        k, v = p.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


_STAGE_ROOT = ("population", "meta", "sweep", "run")  # stages whose --root is population.root


def load_pipeline(args) -> config_mod.PipelineConfig:
    """The pipeline config named by --config / --recipe, with --set (and --tracking-uri) overrides applied."""
    overrides = _overrides(args.set or [])
    if getattr(args, "tracking_uri", None):
        overrides["tracking.tracking_uri"] = args.tracking_uri
    if args.cmd in _STAGE_ROOT and getattr(args, "root", None):
        overrides["population.root"] = args.root
    if args.cmd == "meta" and getattr(args, "out", None):
        overrides["meta.output_dir"] = args.out
    if args.config:
        return config_mod.load(args.config, overrides=overrides)
    data = config_mod.apply_overrides(config_mod.recipe_data(args.recipe or "demo"), overrides)
    return config_mod.parse(config_mod.PipelineConfig, data, source=f"recipe {args.recipe or 'demo'}",
                            overrides=overrides)


def add_common_args(p: argparse.ArgumentParser, address: bool = True) -> None:
    """--config / --recipe / --set (/ --address), shared by the CLI and the jobs/ entry points."""
    p.add_argument("--config", help="pipeline YAML config (see configs/)")
    p.add_argument("--recipe", help="built-in recipe: demo | smoke | paper (default demo)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a dotted config field")
    p.add_argument("--tracking-uri", help="MLflow tracking URI, e.g. http://host:5000 (default: "
                   "$MLFLOW_TRACKING_URI, else SQLite under run_dir); same as --set tracking.tracking_uri=URI")
    if address:
        p.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else in-process Ray)")
    p.add_argument("--verbose", action="store_true", help="show Ray's and MLflow's own logs too (default: only "
                   "dynamo_dist's lines and progress bars; same as DYNAMO_VERBOSE=1)")


def _settings_epilog(stage: str, cls) -> str:
    """The stage's config fields with their defaults and descriptions (the config class is their one source)."""
    import textwrap

    lines = [f"settings (--set {stage}.FIELD=VALUE, or the config's {stage}: section):"]
    for name, f in cls.model_fields.items():
        lines += textwrap.wrap(f"{name} (default {f.default!r}): {f.description}", width=100,
                               initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dynamo-dist", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("population", "train base models with Ray actors and record trajectories"),
                        ("meta", "train the meta-model with Ray Train (theta/V sharded)"),
                        ("sweep", "Ray Tune sweep of lambda, d and hidden distance"),
                        ("run", "the whole pipeline: population -> meta -> (sweep) -> analyze")):
        p = sub.add_parser(name, help=help_)
        add_common_args(p)
        p.add_argument("--root", help="population root (same as --set population.root=DIR)")
        if name == "meta":
            p.add_argument("--out", help="meta output directory (same as --set meta.output_dir=DIR)")
        if name in ("meta", "run"):
            p.add_argument("--register-model", metavar="NAME", help="register the meta run's MLflow Model in the "
                           "store's Model Registry under NAME (a new version each time)")
        if name == "population":
            p.add_argument("--dry-run", action="store_true",
                           help="print per group how many models exist, are complete and would be trained; train nothing")
    an = sub.add_parser("analyze", help="analyses and HTML report of a meta run",
                        epilog=_settings_epilog("analyze", config_mod.AnalyzeConfig),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(an)
    an.add_argument("--meta-dir", help="meta run directory (default: the config's meta.output_dir)")
    an.add_argument("--out", "--out-dir", dest="out_dir", help="where the report goes (default: "
                    "<meta-dir>/analysis; an earlier report there moves to its earlier/ folder)")
    an.add_argument("--no-log", action="store_true", help="do not log the analysis to MLflow")
    sd = sub.add_parser("seeds", help="theta-space stability over meta seeds: one meta run per seed (a finished "
                                      "one is reused), Procrustes-aligned, per-seed and consensus clustering")
    add_common_args(sd)
    runs = sd.add_mutually_exclusive_group()
    runs.add_argument("--seeds", help="comma-separated meta seeds to train and compare, e.g. 0,1,2 (default: the "
                      "config's meta.seeds); runs go to <run_dir>/meta-seeds/seed-<s>")
    runs.add_argument("--meta-dirs", nargs="+", metavar="DIR", help="compare these finished meta runs instead "
                      "(no training); the first is the reference")
    sd.add_argument("--out", help="where seed_stability.json/.md/.png go (default: <parent of the first run>/"
                    "seed-stability)")
    sd.add_argument("--no-log", action="store_true", help="do not log the comparison to MLflow (a run named "
                    "seed-stability in the run's store)")
    ui = sub.add_parser("ui", help="MLflow UI on a run directory's store (127.0.0.1)")
    ui.add_argument("run_dir", nargs="?", default="runs/demo", help="the pipeline's run_dir (holds mlflow.db)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    am = sub.add_parser("add-models", help="record users' pre-trained models (a directory of .safetensors files) "
                                          "into a population root, in this process")
    add_common_args(am, address=False)
    am.add_argument("directory", help="<model_id>.safetensors files [+ architecture.json: zoo fields, or "
                    "{\"factory\": \"pkg.module:build\", ...} for your own nn.Module] [+ labels.csv] "
                    "(docs/user-models.md)")
    am.add_argument("--task", required=True, help="task the models were trained on (e.g. mnist1d, csv:/path.csv, "
                    "npz:/path/data.npz, npy:/path/dir)")
    am.add_argument("--root", help="population root (default: the config's population.root)")
    am.add_argument("--group", help="group label of these models (default: the directory's name)")
    em = sub.add_parser("embed", help="place new models (e.g. from add-models) into a trained meta run's "
                                      "embedding space, without retraining it")
    add_common_args(em, address=False)
    em.add_argument("--meta-dir", help="trained meta run (default: the config's meta.output_dir)")
    em.add_argument("--root", help="population root of the new models (default: the config's population.root)")
    em.add_argument("--models", nargs="+", help="model ids to embed (default: every complete model of --root)")
    em.add_argument("--steps", type=int, default=300, help="optimiser steps of theta/V per model")
    em.add_argument("--out", help="output directory (default: <meta-dir>/posthoc)")
    rp = sub.add_parser("repair", help="check a population root's manifest against its files: rebuild a lost "
                                       "manifest, restore lost rows, mark damaged models failed (retrained next run)")
    add_common_args(rp, address=False)
    rp.add_argument("--root", help="population root (default: the config's population.root)")
    sub.add_parser("recipes", help="print the built-in recipes as YAML")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_console(getattr(args, "verbose", False))
    if args.cmd in ("population", "meta", "sweep", "run") or (args.cmd == "seeds" and not args.meta_dirs):
        from .ray_utils import close_embedded_ray

        close_embedded_ray(args.address)  # before anything imports ray: Ray reads the auth mode once
    try:
        return _dispatch(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"dynamo-dist {args.cmd}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a path the user gave that cannot be written or read (permissions, a file in the way)
        where = f": {err.filename}" if err.filename else ""
        print(f"dynamo-dist {args.cmd}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ndynamo-dist {args.cmd}: interrupted; completed work is kept (every file is written whole), "
              "re-run the same command to resume", file=sys.stderr)
        return 130


def quiet_console(verbose: bool) -> None:
    """Only the project's own lines by default: Ray workers' output stays in Ray's logs
    (``ray_utils.verbose``), MLflow's INFO lines (database migrations) are not shown.
    Set before Ray or MLflow is imported (both read these once)."""
    import os

    if verbose:
        os.environ["DYNAMO_VERBOSE"] = "1"
    elif not os.environ.get("DYNAMO_VERBOSE"):
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a "View run" line per run end


def _dispatch(args) -> int:
    if args.cmd == "recipes":
        for name in config_mod.RECIPES:
            print(f"# --- {name}\n" + yaml.safe_dump(config_mod.recipe(name).model_dump(mode="json"), sort_keys=False))
        return 0
    if args.cmd == "ui":
        from . import tracking

        print(f"MLflow UI for {args.run_dir} at {tracking.ui_url(args.host, args.port)}", flush=True)
        return tracking.serve_ui(args.run_dir, args.host, args.port)
    cfg = load_pipeline(args)
    config_mod.check_cluster_paths(cfg)  # a relative path inside a Ray job's copy of the working dir
    if args.cmd == "add-models":
        return _add_models(args, cfg)
    if args.cmd == "embed":
        return _embed(args, cfg)
    if args.cmd == "repair":
        from .population.repair import repair

        result = repair(args.root or cfg.population.root)
        return 0 if not result["unrecoverable"] else 1
    if args.cmd == "population" and args.dry_run:
        from .population.spec import plan

        rows = plan(cfg.population)
        print(f"population root {cfg.population.root}")
        for r in rows:
            print(f"  {r['group']}: {r['models']} models, {r['complete']} complete, {r['failed']} failed, "
                  f"{r['to_train']} to train")
        print(f"  total: {sum(r['to_train'] for r in rows)} of {sum(r['models'] for r in rows)} to train")
    elif args.cmd == "population":
        from .pipeline import population_stage

        rows = population_stage(cfg, address=args.address)
        print(f"{len(rows)} complete models in {cfg.population.root}")
    elif args.cmd == "meta":
        from .pipeline import meta_stage

        s = meta_stage(cfg, address=args.address, register_model=args.register_model)
        # classifiers' agreement, regression models' output R2 (a population may hold both)
        agree = [f"{name} {s[k]:.3f}" for k, name in (("mean_agreement", "agreement"), ("mean_output_r2", "output R2"))
                 if k in s] or ["agreement nan"]
        print(f"embedded {s['num_models']} models with {s['num_workers']} workers: {', '.join(agree)}, hidden R2 "
              f"{s.get('mean_hidden_r2', float('nan')):.3f} (test split); outputs in {cfg.meta.output_dir}")
        if s.get("registered_model"):
            print(f"registered the meta-model as {s['registered_model']}")
    elif args.cmd == "sweep":
        from .pipeline import sweep_stage

        table = sweep_stage(cfg, address=args.address)
        print(f"{len(table)} trials; best: {table[0]['trial']} ({table[0]['mlflow_run_id']})")
    elif args.cmd == "analyze":
        from .analysis import run_analysis
        from .data.store import to_json

        result = run_analysis(args.meta_dir or cfg.meta.output_dir, cfg.analyze, args.out_dir, log=not args.no_log,
                              progress=True)
        print(to_json({k: v for k, v in result.items() if k not in ("report", "analysis_json")}, indent=1))
        print(f"report: {result['report']}")
    elif args.cmd == "seeds":
        return _seeds(args, cfg)
    elif args.cmd == "run":
        from .pipeline import run_pipeline

        run_pipeline(cfg, address=args.address, register_model=args.register_model)
    return 0


def _add_models(args, cfg: config_mod.PipelineConfig) -> int:
    from pathlib import Path

    from .population import train, user_models
    from .data import store

    root = args.root or cfg.population.root
    # An existing root keeps its own data/recording settings, so new trajectories match its inputs.
    pop_cfg = None if store.Layout.at(root).info.is_file() else cfg.population.replace(root=root)
    rows = user_models.add_model_dir(root, args.directory, args.task, cfg=pop_cfg, group=args.group, progress=True)
    print(f"added {len(rows)} model(s) to {Path(root).resolve()}")
    for g in train.group_summary(rows):
        print(f"{g['group']}: {g['count']} models, test accuracy {g['mean_accuracy']:.3f} ± {g['std_accuracy']:.3f}")
    return 0


def _seeds(args, cfg: config_mod.PipelineConfig) -> int:
    from .analysis import seeds
    from .pipeline import check_seeds, parse_seeds, seeds_stage, tracking_store

    if args.meta_dirs:
        dirs = args.meta_dirs
    else:
        chosen = parse_seeds(args.seeds) if args.seeds else check_seeds(cfg.meta.seeds)
        dirs = seeds_stage(cfg, chosen, address=args.address)
    started = time.time()
    r = seeds.run_seed_stability(dirs, args.out, color_by=cfg.analyze.color_by, random_state=cfg.analyze.seed)
    if not args.no_log:
        mlflow_store = tracking_store(cfg)
        r["mlflow_run_id"] = seeds.log_mlflow(r, mlflow_store, started)
    print(f"{'seed':>6} {'ARI':>7} {'silhouette':>10} {'disparity':>9}  (k-means vs {r['color_by']}, "
          f"k={r['num_clusters']}; disparity to seed {r['reference_seed']})")
    for p in r["per_seed"]:
        print(f"{p['seed']:>6} {p['adjusted_rand']:>7.3f} {p['silhouette']:>10.3f} {p['disparity_to_reference']:>9.3f}")
    print(f"seed stability (mean pairwise ARI) {r['seed_stability']:.3f}, distance stability "
          f"{r['distance_stability']:.3f}, consensus ARI {r['consensus_adjusted_rand']:.3f}")
    if r.get("warning"):
        print(f"warning: {r['warning']}")
    print(f"written: {r['out_dir']}/{seeds.JSON_FILE}, {seeds.TABLE_FILE}, {seeds.FIGURE_FILE}")
    if r.get("mlflow_run_id"):
        print(f"logged: MLflow run {r['mlflow_run_id']} (seed-stability) in {mlflow_store.uri}")
    return 0


def _embed(args, cfg: config_mod.PipelineConfig) -> int:
    from .data import store
    from .meta.posthoc import run_posthoc

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    root = store.absolute(args.root or cfg.population.root)
    rows = store.manifest_rows(root)
    # damaged files of the models to embed: refused before the meta run is loaded or anything written
    store.check_intact(root, [r for r in rows if not args.models or r["model_id"] in args.models])
    path = run_posthoc(args.meta_dir or cfg.meta.output_dir, root, args.models,
                       steps=args.steps, out_dir=args.out, progress=True)
    rows = store.read_parquet(path, "post-hoc embeddings").to_pylist()  # local, or in a bucket
    shown = set(args.models) if args.models else {r["model_id"] for r in rows}
    print(f"{'model':<24} {'agreement':>9} {'hidden R2':>9}  nearest trained model (group, distance)")
    for r in rows:
        if r["model_id"] in shown:
            print(f"{r['model_id']:<24} {r['agreement']:>9.3f} {r['hidden_r2']:>9.3f}  "
                  f"{r['nearest_model']} ({r['nearest_group']}, {r['nearest_distance']:.3f})")
    print(f"written: {path} and {path.parent / 'embedding_pca.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
