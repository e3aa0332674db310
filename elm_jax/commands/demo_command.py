"""`elm-jax demo`: the paper's experiments in miniature on the built-in suite (no download).

    elm-jax demo [--out elm_demo] [--quick]

Writes report.md, report.json and PNG plots to --out. Finished stages are kept in
<out>/stages/ and skipped when the command is run again (after an interruption, say).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from elm_jax.demo import pipeline, report


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--out", default="elm_demo", help="output directory (reused to resume)")
  parser.add_argument("--quick", action="store_true",
                      help="a one-layer model on a smaller budget (about 2.5 minutes on 2 cores; "
                           "the full one about 6)")
  parser.add_argument("--budget", choices=sorted(pipeline.BUDGETS), default=None,
                      help="named budget (overrides --quick); 'test' learns nothing and is for tests")
  parser.add_argument("--no_progress", action="store_true", help="no progress bars")


class _DropUncachedWarning(logging.Filter):
  """SeqIO warns once per training pipeline that the built-in tasks are not cached; they are
  generated in memory, so the warning says nothing useful here."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "uncached FunctionDataset" not in record.getMessage()


def main(args: argparse.Namespace) -> int:
  logging.getLogger("absl").addFilter(_DropUncachedWarning())
  name = args.budget or ("quick" if args.quick else "full")
  start = time.perf_counter()
  demo = pipeline.Demo(args.out, pipeline.BUDGETS[name], progress=not args.no_progress)
  demo.run()
  written = report.write_report(demo)
  held = written["stages"]["held_out"]
  best = max(held["expert_mean"], key=held["expert_mean"].get)
  print(f"held-out mean accuracy: multitask baseline {held['baseline_mean']:.1f}%, best expert "
        f"{best} {held['expert_mean'][best]:.1f}%; RoE top-1 "
        f"{written['stages']['retrieval']['roe_top1_mean']:.1f}%")
  print(f"report: {demo.path('report.md')} ({time.perf_counter() - start:.0f}s, budget {name!r})",
        file=sys.stderr)
  return 0
