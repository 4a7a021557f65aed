r"""Run one of the papers' comparisons end to end: every method, then tables and plots.

  python experiments/compare/compare.py --set=fedsparsify   # FedSparsify's Figures 2-3, 12
  python experiments/compare/compare.py --set=sparsyfed     # SparsyFed's Figures 2-3

Each member is exactly a `experiments/run.py` run (the set's flagfile + the member's flags,
see `experiments/compare/sets.py`) in its own folder under --runs_dir/<set>/<group>/<method>,
run in this process one after the other; re-running the command resumes unfinished members
and skips finished ones. Then --out (default experiments/results/compare_<set>) gets
README.md (the tables, the plots, this command and every member's run.py command),
summary.json, each member's config.json and metrics.jsonl, and the plots: accuracy vs round,
accuracy vs cumulative MB (uplink + downlink), global density vs round, and for the sparsyfed
set the IoU heat-map of every method's global masks.

Shorten a run for a smoke test with --rounds=N and --override=--flag=value (appended to every
member, e.g. --override=--local_epochs=1); --methods and --groups pick members by label.
"""
import datetime
import json
import os
import shutil
import sys
import time
from typing import Any, Dict, List, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [p for p in (ROOT, HERE, os.path.dirname(HERE)) if p not in sys.path]

from absl import app, flags, logging  # noqa: E402

import report  # noqa: E402  (experiments/compare/report.py)
import run as run_script  # noqa: E402  (experiments/run.py: its flags -> ExperimentConfig)
import sets  # noqa: E402

def define_flags() -> None:
  """The command's flags (defined only when it runs, so importing this module for its
  helpers never clashes with another script's flags)."""
  flags.DEFINE_enum("set", None, list(sets.SETS), "Which paper's comparison to run.")
  flags.DEFINE_string("out", "", "Results folder (default experiments/results/compare_<set>).")
  flags.DEFINE_string("runs_dir", "runs/compare", "Where the members' run folders go.")
  flags.DEFINE_integer("rounds", 0, "Rounds per member; 0 = the set's (fedsparsify 200, "
                       "sparsyfed 30).")
  flags.DEFINE_list("methods", [], "Member labels to run (default: all of the set).")
  flags.DEFINE_list("groups", [], "Group labels to run (sparsyfed: alpha0.1, alpha1.0).")
  flags.DEFINE_multi_string("override", [], "A run.py flag appended to every member's command "
                            "(repeatable), e.g. --override=--local_epochs=1.")
  flags.DEFINE_integer("seeds", 1, "Seed replicas per method: replica s adds s to all four "
                       "seeds. With N > 1 each method's replicas run together as one sweep "
                       "(one jitted program, sparsefl_jax.sweep) in <method>/seed_offset=s, and "
                       "the tables show mean ± std over the replicas.")
  flags.DEFINE_integer("sweep_chunk", 0, "Replicas run at once with --seeds > 1 (0 = all).")
  flags.DEFINE_bool("report_only", False, "Only rebuild the tables and plots from the runs.")


FLAGS = flags.FLAGS


def _pick(wanted: Sequence[str], available: Sequence[str], what: str) -> List[str]:
  bad = [w for w in wanted if w not in available]
  if bad:
    raise ValueError(f"--{what}={','.join(bad)} is not among {list(available)}")
  return [a for a in available if not wanted or a in wanted]


def member_argv(cset: sets.ComparisonSet, member: sets.Member, group_flags: Sequence[str],
                rounds: int, workdir: str, overrides: Sequence[str]) -> List[str]:
  """The run.py command line (without the program) of one member."""
  flagfile = os.path.relpath(os.path.join(ROOT, cset.flagfile))   # from the current folder
  return [f"--flagfile={flagfile}", *cset.common, *group_flags,
          *member.flags_for(rounds), f"--rounds={rounds}", *overrides, f"--workdir={workdir}"]


def config_for(argv: Sequence[str]):
  """The ExperimentConfig run.py would build from `argv` (its own flag definitions)."""
  fv = flags.FlagValues()
  full = ["run.py", *argv]
  run_script.define_flags(full, flag_values=fv)
  try:
    fv(full)
  except flags.Error as e:
    raise ValueError(" ".join(str(e).split())) from None
  return run_script.config_from_flags(fv)


def replica_dirs(workdir: str, seeds: int) -> List[str]:
  """The run folders of a member: itself, or one per seed replica (as sweep.py names them)."""
  if seeds == 1:
    return [workdir]
  return [os.path.join(workdir, f"seed_offset={s}") for s in range(seeds)]


def run_member(argv: Sequence[str], seeds: int = 1, chunk: int = 0) -> None:
  """One member, as `python experiments/run.py <argv>` would run it; with seeds > 1, its seed
  replicas as one sweep, as `python experiments/sweep.py <argv> --seeds=N` would."""
  from sparsefl_jax import sweep, train
  cfg = config_for(argv)
  if seeds == 1:
    train.run(cfg)
    return
  configs = [sweep.offset_seeds(cfg, s).replace(workdir=d)
             for s, d in enumerate(replica_dirs(cfg.workdir, seeds))]
  results = sweep.run_sweep(configs, chunk=chunk)
  bad = [r for r in results if r.get("status") not in ("done", None)]
  if bad:
    raise RuntimeError("; ".join(f"{r['name']}: {r.get('status')} {r.get('message', '')}"
                                 for r in bad))


def main(argv) -> None:
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  cset = sets.SETS[FLAGS.set]
  rounds = FLAGS.rounds or cset.rounds
  if rounds < 2:
    _fail(f"--rounds={rounds} must be >= 2 (0 = the set's {cset.rounds})")
  if FLAGS.seeds < 1 or FLAGS.sweep_chunk < 0:
    _fail(f"--seeds={FLAGS.seeds} must be >= 1 and --sweep_chunk={FLAGS.sweep_chunk} >= 0")
  try:
    labels = _pick(FLAGS.methods, [m.label for m in cset.members], "methods")
    groups = _pick(FLAGS.groups, [g for g, _ in cset.groups], "groups")
  except ValueError as e:
    _fail(str(e))
  out = FLAGS.out or os.path.join(ROOT, "experiments", "results", f"compare_{cset.name}")
  runs_root = os.path.join(FLAGS.runs_dir, cset.name)
  # The command that produces the runs (a --report_only rebuild reads the same runs).
  command = "python experiments/compare/compare.py " + " ".join(
      a for a in sys.argv[1:] if a.split("=")[0] != "--report_only")
  members = [m for m in cset.members if m.label in labels]
  plan = []   # (group label, member, workdir, argv)
  for group, group_flags in cset.groups:
    if group not in groups:
      continue
    for m in members:
      workdir = os.path.join(runs_root, group, m.label)
      plan.append((group, m, workdir,
                   member_argv(cset, m, group_flags, rounds, workdir, FLAGS.override)))
  failed: Dict[str, str] = {}
  if not FLAGS.report_only:
    for i, (group, m, workdir, margv) in enumerate(plan):
      name = f"{group}/{m.label}" if group else m.label
      print(f"[{i + 1}/{len(plan)}] {name}: python experiments/run.py {' '.join(margv)}",
            flush=True)
      start = time.time()
      try:
        run_member(margv, FLAGS.seeds, FLAGS.sweep_chunk)
      except Exception as e:   # noqa: BLE001  one member's failure must not lose the others
        failed[name] = " ".join(str(e).split())[:300] or type(e).__name__
        print(f"  failed: {failed[name]}", flush=True)
        continue
      print(f"  done in {time.time() - start:.0f} s", flush=True)
  write_report(cset, plan, rounds, out, command, failed, FLAGS.seeds)
  if failed:
    _fail(f"{len(failed)} of {len(plan)} members failed: {', '.join(failed)}", code=1)


def write_report(cset: sets.ComparisonSet, plan, rounds: int, out: str, command: str,
                 failed: Dict[str, str], seeds: int = 1) -> None:
  """README.md, summary.json, the members' metrics and the plots in `out`."""
  os.makedirs(out, exist_ok=True)
  lines = [f"# {cset.title}", "",
           f"Produced by `{command}` on {datetime.date.today().isoformat()}, {rounds} rounds "
           "per method" + (f" ({cset.rounds_note})" if cset.rounds_note and rounds == cset.rounds
                           else "") + "." + (
               f" Each method ran {seeds} seed replicas as one sweep (all four seeds offset "
               "by 0, 1, ...); cells are mean ± std over them, curves and heat-maps show "
               "replica 0." if seeds > 1 else ""),
           "Every method is one `experiments/run.py` command (listed at the end); "
           "re-running the command above resumes or reuses them.", ""]
  summaries: Dict[str, Any] = {}
  commands = []
  for group, _ in cset.groups:
    entries, runs = [], {}
    group_plan = [p for p in plan if p[0] == group]
    if not group_plan:
      continue
    prefix = f"{group}_" if group else ""
    for _, m, workdir, margv in group_plan:
      name = f"{group}/{m.label}" if group else m.label
      commands.append(f"python experiments/run.py {' '.join(margv)}" if seeds == 1 else
                      f"python experiments/sweep.py {' '.join(margv)} --seeds={seeds}")
      dirs = replica_dirs(workdir, seeds)
      loaded = [report.load_run(d) for d in dirs]
      if name in failed or any(l is None for l in loaded):
        entries.append({"title": m.title, "error": failed.get(name, "no metrics")})
        continue
      s = report.over_seeds([report.summary(l) for l in loaded])
      entries.append({"title": m.title, "summary": s})
      summaries[name] = s
      runs[m.title] = loaded[0]["rows"]   # curves: the first replica
      for d in dirs:
        keep = os.path.join(out, "runs", group, m.label, os.path.relpath(d, workdir))
        os.makedirs(keep, exist_ok=True)
        for f in ("config.json", "metrics.jsonl"):
          shutil.copyfile(os.path.join(d, f), os.path.join(keep, f))
      if cset.table == "sparsyfed":
        drawn = os.path.join(out, f"{prefix}iou_{m.label}.png")
        heat = report.iou_heatmap(dirs[0], drawn, title=f"{m.title}: IoU of global masks")
        if heat or os.path.exists(drawn):   # a rebuild without the masks keeps the drawn map
          s["iou_heatmap"] = os.path.basename(drawn)
    lines += [f"## {group}" if group else "## Results", "", report.table(cset.table, entries)]
    for path in report.curves(runs, out, prefix, cset.title.split(" (")[0] +
                              (f", {group}" if group else "")):
      lines.append(f"![{os.path.basename(path)}]({os.path.basename(path)})")
    heats = [s.get("iou_heatmap") for n, s in summaries.items()
             if n.startswith(f"{group}/") and s.get("iou_heatmap")]
    if heats:
      lines += ["", "IoU heat-maps of the global masks (round × round):", ""]
      lines += [f"![{h}]({h})" for h in heats]
    lines.append("")
  lines += ["## Commands", "", "```sh", *commands, "```", ""]
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write("\n".join(lines))
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"command": command, "rounds": rounds, "runs": summaries,
               "failed": failed}, f, indent=1)
  print(f"wrote {os.path.join(out, 'README.md')}")


def _fail(message: str, code: int = 2) -> None:
  sys.stderr.write(f"error: {message}\n")
  sys.exit(code)


if __name__ == "__main__":
  define_flags()
  flags.mark_flag_as_required("set")
  app.run(main)
