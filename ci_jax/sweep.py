"""Sweeps: many runs from one spec, sharing every model they can, one CSV row per finished run.

A spec (YAML, JSON, or a Python file defining SPEC) names a preset, base config fields, an
optional list of `cases` (each a set of fields, with an optional `case` label), an optional list of
`defenses` (named reference settings of ci_jax.defenses.variants, e.g. [ci/authors, scan/e]), a
`grid` of fields to vary (every combination), and the `seeds`. Runs = seeds x cases x defenses x
grid; without `defenses`, seeds x cases x grid. A variant's fields override `base`, and a case's
or the grid's override the variant's (a grid that lowers STRIP's N applies to the STRIP variants
that set it); a case or grid may not set defense.name beside `defenses`. Each run's row names its
variant in a `defense` column, the summary groups by it (after the case), and `--where
defense=NAME` picks runs by it.

Runs that share data, attack, model, training and seed share one baseline under
OUT/baselines/ (or MODELS/baselines/), trained once; its passes and mixtures are cached beside it. A finished run appends one
row to the results CSV (rewritten atomically), so a restarted sweep skips exactly the runs
already there. The CSV is a table of the runs' reports (OUT/runs/RUN_ID/report.json): a damaged
one is set aside and rebuilt from them, so damage costs at most the runs without a report.
`shard=(i, n)` runs a deterministic 1/n of the baselines with all their runs,
writing results-i-of-n.csv; `merge` joins the shards and writes the summary. `where` picks the
runs with given config values, so that a large spec can be run piece by piece.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import re
import runpy
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm.auto import tqdm

from ci_jax import config as config_lib
from ci_jax import errors, files, metrics, settings
from ci_jax.defenses import variants
from ci_jax.report import Report
from ci_jax.config import Config
from ci_jax.errors import UserError, unknown_name

# TPR at FPR <= x (x as a fraction, like every rate of the table) for each of metrics.OPERATING_POINTS.
OPERATING_COLUMNS: tuple[str, ...] = tuple(f"tpr_at_fpr_{x}" for x in metrics.OPERATING_POINTS)
METRICS: tuple[str, ...] = ("clean_before", "asr_before", "untriggered_before", "removed", "tpr", "fpr",
                            "precision", "auc", *OPERATING_COLUMNS, "clean_after", "asr_after", "seconds")
# Columns added after results CSVs had been written without them: a CSV lacking all of them is of
# that age (its rows are rebuilt from the runs' reports), one lacking some of them is damaged.
LATER_COLUMNS: tuple[str, ...] = ("untriggered_before", *OPERATING_COLUMNS, "oracle")
# The figures that score a backdoor: an invalid attack cell (metrics.attack_cell_validity) shows none.
SCORING: tuple[str, ...] = ("tpr", "precision", "auc", *OPERATING_COLUMNS, "asr_after")
SPEC_KEYS = {"name", "preset", "base", "cases", "defenses", "grid", "seeds", "retrain_seeds"}
DEFENSE = "defense.name"  # a summary varying this field gets an ROC plot per attack
VARIANT = "defense"  # the column naming a run's defense variant (a spec's `defenses:`)
ORACLE_MARK = "†"
# A Run and its config take about this much memory; a spec whose runs would not fit is refused
# before they are built (a grid of 10^8 combinations is a typo, not a plan).
_BYTES_PER_RUN = 16_384
_DATASETS: tuple[str, ...] = config_lib.PATHS["data.dataset"].meta["choices"]


@dataclasses.dataclass(frozen=True)
class Run:
    run_id: str
    cfg: Config
    varied: dict[str, Any]  # the case label and the fields this run sets beyond the base
    detect_id: str  # the same run without retraining: its row stands in for this one's detection


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    fields: tuple[str, ...]  # varied columns, in spec order ("case" first when cases are labelled)
    runs: tuple[Run, ...]
    summary_fields: tuple[str, ...]  # what the summary groups by: a case's label stands for its fields


# -- spec ---------------------------------------------------------------------------------------
def read_spec(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if path.suffix == ".py":
        try:
            spec = runpy.run_path(str(path)).get("SPEC")
        except FileNotFoundError:
            raise UserError(f"sweep spec {path} does not exist") from None
        except Exception as e:  # a user's Python file: any error in it is theirs to fix
            raise UserError(f"sweep spec {path} failed to run: {type(e).__name__}: {e}") from None
        if not isinstance(spec, dict):
            raise UserError(f"sweep spec {path}: define SPEC = {{...}} (a dict) in the file")
        return spec
    return config_lib.load_file(path)


def expand(spec: dict[str, Any], where: str = "spec") -> Spec:
    """The runs of a spec, in a fixed order: seeds, then cases, then grid combinations, so that a
    sweep stopped part-way has covered every cell once before it repeats any with another seed.

    Fields are dotted config paths (`defense.ci.tau`), in `base`, `cases` and `grid` alike; a
    case may give a `case` label. `defenses` lists variant names (ci_jax.defenses.variants), each
    run once per case, between the cases and the grid. `retrain_seeds` (default: every seed) lists
    the seeds whose runs retrain after the defense; the others are detection-only (defense.retrain false).
    """
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                        f"a spec has {', '.join(sorted(SPEC_KEYS))}")
    flat = lambda m, what: config_lib.flatten(_mapping(m, f"{where}: {what}"), f"{where}: {what}")
    base = flat(spec.get("base", {}), "base")
    grid = _mapping(spec.get("grid", {}), f"{where}: grid")
    for field, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: grid.{field} must be a non-empty list of values")
    flat({k: v[0] for k, v in grid.items()}, "grid")  # unknown field names, before any work
    cases = spec.get("cases", [{}])
    if not isinstance(cases, list) or not cases or not all(isinstance(c, dict) for c in cases):
        raise UserError(f"{where}: cases must be a non-empty list of mappings of config fields")
    cases = [({"case": str(c["case"])} if "case" in c else {}) | flat({k: v for k, v in c.items() if k != "case"}, "case")
             for c in cases]
    chosen = _variants(spec, cases, grid, where)
    seeds = _seeds(spec.get("seeds", [0]), f"{where}: seeds")
    retrain_seeds = set(_seeds(spec.get("retrain_seeds", seeds), f"{where}: retrain_seeds", empty_ok=True))
    if "seed" in grid or "seed" in base or any("seed" in c for c in cases):
        raise UserError(f"{where}: set seeds with the top-level `seeds` list, not as a field")
    count = len(cases) * len(chosen or [None]) * math.prod(len(v) for v in grid.values()) * len(seeds)
    free = files.available_memory()
    if free is not None and count * _BYTES_PER_RUN > free:
        raise UserError(f"{where}: {count} runs ({len(cases)} cases x defenses x grid x {len(seeds)} seeds) would not "
                        f"fit in the {free // 2**20} MiB of memory available, let alone finish: "
                        "split the sweep into smaller specs")
    labelled = any("case" in c for c in cases)
    case_fields = list(dict.fromkeys(k for c in cases for k in c if k != "case"))
    named = (("case",) if labelled else ()) + ((VARIANT,) if chosen else ())
    fields = named + tuple(case_fields) + tuple(f for f in grid if f not in case_fields)
    preset = spec.get("preset", "default")
    runs, seen = [], {}
    for seed, (i, case), variant, combo in itertools.product(seeds, enumerate(cases), chosen or [None],
                                                              itertools.product(*grid.values())):
        label = case.get("case", str(i))
        varied = {**{k: v for k, v in case.items() if k != "case"}, **dict(zip(grid, combo))}
        overrides = {**base, **(variant.fields if variant else {}), **varied, "seed": seed}
        if seed not in retrain_seeds:
            overrides["defense.retrain"] = False
        try:
            cfg = config_lib.preset(preset, overrides)
        except UserError as e:
            raise UserError(f"{where}: case {label}{f', defense {variant.name}' if variant else ''}, {varied}: {e}") from None
        run_id = config_lib.fingerprint(config_lib.run_identity(cfg))
        if run_id in seen:
            if variant is not None and seen[run_id] != variant.name:
                raise UserError(f"{where}: case {label}: defenses {seen[run_id]} and {variant.name} give the same run "
                                "(a case or grid field sets what tells them apart): list one of them")
            continue  # e.g. a grid value equal to a case's own: one run, not two
        seen[run_id] = variant.name if variant else None
        row = ({"case": label} if labelled else {}) | ({VARIANT: variant.name} if variant else {}) | \
            {f: _show(settings.get(cfg, f)) for f in fields if f not in named}
        detect_id = config_lib.fingerprint(config_lib.run_identity(config_lib.replace(cfg, {"defense.retrain": False})))
        runs.append(Run(run_id, cfg, row, detect_id))
    summary = (named + tuple(grid)) if labelled else fields
    return Spec(str(spec.get("name", "sweep")), fields, tuple(runs), summary)


def _variants(spec: dict[str, Any], cases: list[dict[str, Any]], grid: dict[str, Any],
              where: str) -> list[variants.Variant]:
    """The spec's `defenses`, checked before any work: [] when it has none."""
    if "defenses" not in spec:
        return []
    names = spec["defenses"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UserError(f"{where}: defenses must be a non-empty list of defense variant names "
                        f"(e.g. [{', '.join(variants.NAMES[:2])}])")
    twice = next((n for k, n in enumerate(names) if n in names[:k]), None)
    if twice is not None:
        raise UserError(f"{where}: defenses lists {twice} twice: list each variant once")
    chosen = []
    for name in names:
        try:
            chosen.append(variants.get(name))
        except UserError as e:
            raise UserError(f"{where}: defenses: {e}") from None
    if DEFENSE in grid or any(DEFENSE in c for c in cases):
        raise UserError(f"{where}: a case or the grid sets {DEFENSE} beside `defenses`, which names the defense "
                        "of every run: drop one of them")
    return chosen


def _show(value: Any) -> Any:
    return " ".join(value) if isinstance(value, tuple) else value


def _seeds(value: Any, where: str, empty_ok: bool = False) -> list[int]:
    if not isinstance(value, list) or not (value or empty_ok) or \
            not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise UserError(f"{where} must be a {'' if empty_ok else 'non-empty '}list of whole numbers")
    return value


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a mapping of config fields")
    return value


def _data_dir(data_dir: str | os.PathLike | dict[str, str] | None, name: str) -> str | os.PathLike | None:
    """The data dir for dataset `name`: one directory for all, or {dataset: directory}."""
    if isinstance(data_dir, dict):
        return data_dir.get(name)
    return data_dir


def parse_data_dirs(items: list[str] | None) -> str | dict[str, str] | None:
    """--data-dir DIR, or --data-dir mnist=DIR fashion_mnist=DIR2 for a sweep over datasets."""
    if not items:
        return None
    if len(items) == 1 and "=" not in items[0]:
        return items[0]
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--data-dir {item!r}: give one DIR, or NAME=DIR for each dataset "
                            "(e.g. mnist=../shared/data/mnist)")
        if name not in _DATASETS:
            raise unknown_name("dataset in --data-dir", name, _DATASETS)
        if name in out:
            raise UserError(f"--data-dir: {name} is given twice ({out[name]} and {path}): give one directory")
        out[name] = path
    return out


def check_data_dirs(spec: Spec, data_dir: str | os.PathLike | dict[str, str] | None) -> None:
    """A NAME=DIR for a dataset that no run of the spec uses is a typo or the wrong spec: without
    this check the directory would be ignored and the dataset the user meant found elsewhere."""
    if not isinstance(data_dir, dict):
        return
    used = list(dict.fromkeys(r.cfg.data.dataset for r in spec.runs))
    for name in data_dir:
        if name not in used:
            raise unknown_name("--data-dir dataset (no run of the sweep uses it):", name, used)


# Shards are array-job tasks, and schedulers cap arrays far below this (Slurm's MaxArraySize at most
# 4,000,001): a larger N is a typo, and the digits are bounded before int() parses them.
MAX_SHARDS = 10**6


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' (0 <= i < n <= MAX_SHARDS) -> (i, n)."""
    m = re.fullmatch(r"(\d{1,7})/(\d{1,7})", text.strip())
    if not m or not 0 <= int(m[1]) < int(m[2]) <= MAX_SHARDS:
        raise UserError(f"--shard {errors.one_line(text, 40)!r}: expected i/n with 0 <= i < n <= {MAX_SHARDS}, "
                        "e.g. 0/4 for the first of four")
    return int(m[1]), int(m[2])


def check_shard(spec: Spec, i: int, n: int) -> None:
    """A shard runs whole baselines, so beyond one shard per baseline the extra shards have nothing
    to run: an array job that large is a mistake in N, not a plan."""
    baselines = len({_model_key(r) for r in spec.runs})
    if n > baselines:
        raise UserError(f"--shard {i}/{n}: the spec has {baselines} baseline(s) and a shard runs whole baselines, "
                        f"so {n - baselines} of {n} shards would run nothing: use N <= {baselines}")


def parse_where(items: list[str] | None) -> dict[str, list[str]]:
    """--where PATH=VALUE[,VALUE...] (repeatable) -> {dotted path: accepted values as text}. Each
    value must parse as its field's type; `check_where` then holds them against a spec. PATH
    `defense` picks by defense variant (a spec's `defenses`): its values are variant names."""
    where: dict[str, list[str]] = {}
    for item in items or ():
        path, sep, values = item.partition("=")
        if not sep or not path or not values:
            raise UserError(f"--where {item!r}: expected PATH=VALUE[,VALUE...], e.g. data.dataset=mnist or seed=0,1")
        if path != VARIANT:
            config_lib.flatten({path: None}, "--where")  # an unknown path, with a suggestion
        for text in (v.strip() for v in values.split(",")):
            if not text:
                raise UserError(f"--where {item!r}: an empty value; separate values by single commas")
            if path == VARIANT:
                if text not in variants.VARIANTS:
                    raise unknown_name("--where defense variant", text, variants.NAMES)
                where.setdefault(path, []).append(text)
                continue
            try:
                _where_text(path, text)
            except UserError as e:
                # parse_flag_value names the flag --PATH, which a sweep does not have: keep its reason.
                msg = str(e)
                raise UserError(f"--where {path}={errors.one_line(text, 60)}: "
                                f"{msg[msg.find('expected'):] if 'expected' in msg else msg}") from None
            where.setdefault(path, []).append(text)
    return where


def check_where(runs: tuple[Run, ...] | list[Run], where: dict[str, list[str]]) -> None:
    """Every value of `where` must be one that some run of the spec has, and together they must
    pick at least one run: a --where that picks nothing would run nothing and exit as if done."""
    for path, texts in where.items():
        have = list(dict.fromkeys(_value_text(r, path) for r in runs))
        if path == VARIANT and have == [""]:
            raise UserError(f"--where {VARIANT}=...: the spec lists no `defenses`; pick by {DEFENSE} instead")
        for text in texts:
            try:
                ok = _where_text(path, text) in have
            except UserError:
                ok = False
            if not ok:
                raise unknown_name(f"--where {path} value (no run of the spec has it):", text, have)
    if not select(runs, where):
        shown = " ".join(f"{p}={','.join(v)}" for p, v in where.items())
        raise UserError(f"--where {shown}: every value is in the spec, but no run has them all together: "
                        "drop one, or pick values that occur in one run")


def _where_text(path: str, text: str) -> str:
    """A --where value as `_as_text` shows the config value it means (1 -> 1.0 for a float field,
    TRUE -> true); UserError when it does not parse as the field's type."""
    if path == VARIANT:
        return text
    leaf = config_lib.PATHS[path]
    return _as_text(tuple(text.split()) if leaf.kind is tuple else settings.parse_flag_value(leaf, text))


def select(runs: tuple[Run, ...] | list[Run], where: dict[str, list[str]]) -> list[Run]:
    """The runs whose config has, at every path of `where`, one of its values (a list of names as
    its names separated by spaces, e.g. defense.ci.filters=median3 quant)."""
    wanted = {path: {_where_text(path, v) for v in values} for path, values in where.items()}
    return [r for r in runs if all(_value_text(r, path) in ok for path, ok in wanted.items())]


def _value_text(run: Run, path: str) -> str:
    """A run's value at a --where path: its defense variant's name ("" when none) or its config's."""
    return str(run.varied.get(VARIANT, "")) if path == VARIANT else _as_text(settings.get(run.cfg, path))


def _as_text(value: Any) -> str:
    """A config value as --where compares it: names joined by spaces, true/false, numbers."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(_show(value))


def _model_key(r: Run) -> str:
    return config_lib.fingerprint(config_lib.model_identity(r.cfg))


def shard_runs(runs: tuple[Run, ...], i: int, n: int) -> list[Run]:
    """Shard i of n: whole baselines go to one shard, so no two shards train the same model."""
    keys = list(dict.fromkeys(_model_key(r) for r in runs))
    mine = {k for j, k in enumerate(keys) if j % n == i}
    return [r for r in runs if _model_key(r) in mine]


# -- results CSV --------------------------------------------------------------------------------
def columns(spec: Spec) -> list[str]:
    return ["run_id", *spec.fields, "seed", *METRICS, "oracle"]


class Damaged(Exception):
    """A sweep file that is not what ci-jax writes: undecodable, or of the wrong shape."""


def read_rows(path: Path, need: list[str] | tuple[str, ...] = ("run_id",)) -> list[dict[str, str]]:
    """The rows of a results CSV ([] when there is none). Damaged when it is not UTF-8 CSV, lacks a
    column of `need`, names a column twice, has a row of another length than its header (a
    truncated file), or a seed or metric that is not a number: a caller never sees a half row."""
    if not path.exists():
        return []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise Damaged(f"not UTF-8 text (bad byte at offset {e.start})") from None
    except OSError as e:  # a directory in its place, no permission: not damage to rebuild over
        raise UserError(f"cannot read {path}: {files.os_reason(e)}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        head = next(reader, None)
        if not head:
            raise Damaged("no header line")
        if len(set(head)) != len(head):
            raise Damaged("a column is named twice")
        later = [c for c in need if c in LATER_COLUMNS]
        older = all(c not in head for c in later)  # written before those columns: its rows lack them
        missing = [c for c in need if c not in head and not (older and c in LATER_COLUMNS)]
        if missing:
            raise Damaged(f"no column {errors.one_line(missing[0], 60)}")
        rows = []
        for cells in reader:
            if not cells:
                continue  # a blank line
            if len(cells) != len(head):
                raise Damaged(f"line {reader.line_num} has {len(cells)} cells, the header {len(head)}")
            row = dict(zip(head, cells))
            bad = [c for c in ("seed", *METRICS) if c in row and not _numeric(row[c], whole=c == "seed")]
            if not row["run_id"] or bad:
                raise Damaged(f"line {reader.line_num}: " + (f"{bad[0]} {errors.one_line(repr(row[bad[0]]), 40)} "
                                                           "is not a number" if bad else "no run_id"))
            rows.append(row)
    except csv.Error as e:  # a NUL byte, an unterminated quote, a cell beyond csv's size limit
        raise Damaged(f"not CSV: {errors.one_line(e, 80)}") from None
    return rows


def _numeric(text: str, whole: bool) -> bool:
    if text == "":
        return not whole  # a metric a run does not have (no ASR after a detection-only run)
    if whole:
        return re.fullmatch(r"-?\d{1,12}", text) is not None
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def set_aside(path: Path) -> Path:
    """Renames a damaged file to PATH.damaged (or .damaged-2, ...) and returns the new path: what
    it held stays for a person to read, and nothing reads it again."""
    for k in itertools.count(1):
        aside = path.with_name(f"{path.name}.damaged" + (f"-{k}" if k > 1 else ""))
        if not aside.exists():
            os.replace(path, aside)
            return aside
    raise AssertionError("unreachable")


def write_rows(path: Path, cols: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows({c: _cell(r.get(c)) for c in cols} for r in rows)
    files.write_text(path, buf.getvalue())


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


def row_of(run: Run, report: Report) -> dict[str, Any]:
    """The run's CSV row. oracle: what the defense knew of the ground truth, as its own report says
    (its "oracle" key; "" when it used none)."""
    b, d, r = report.baseline, report.defense.detection, report.retrained
    points = d.tpr_at_fpr or {}  # none in a report from before they were measured
    oracle = report.defense.own.get("oracle")
    return {"run_id": run.run_id, **run.varied, "seed": run.cfg.seed,
            "clean_before": b.clean_acc, "asr_before": b.asr, "untriggered_before": b.target_rate_untriggered,
            "removed": d.removed, "tpr": d.tpr, "fpr": d.fpr, "precision": d.precision, "auc": d.auc,
            **{c: points.get(str(x)) for c, x in zip(OPERATING_COLUMNS, metrics.OPERATING_POINTS)},
            "clean_after": r.clean_acc, "asr_after": r.asr, "seconds": report.timings_s["total"],
            "oracle": errors.one_line(oracle, 200) if oracle else ""}


def report_row(out: Path, run: Run) -> dict[str, Any] | None:
    """The run's row from its finished report (OUT/runs/RUN_ID/report.json), or None when there is
    none, or it is unreadable, of another run (config.identity_of: settings of defenses and attacks
    the run does not use do not count), or of another shape: a run without a sound report is not
    done, and runs again."""
    try:
        report = Report.from_json(files.read_json(out / "runs" / run.run_id / "report.json"))
        if config_lib.identity_of(report.config) != config_lib.run_identity(run.cfg):
            return None
        row = row_of(run, report)
    except Exception:  # noqa: BLE001 - OSError, bad UTF-8 or JSON, a missing key, a list for a dict: not done
        return None
    sound = lambda v: v is None or isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return row if all(sound(row[m]) for m in METRICS) else None


def _detect_twin(run: Run) -> Run | None:
    """The run without retraining (a detection-only pass of the same spec), or None if it is one."""
    if run.detect_id == run.run_id:
        return None
    cfg = config_lib.replace(run.cfg, {"defense.retrain": False})
    varied = {k: v if k in ("case", VARIANT) else _show(settings.get(cfg, k)) for k, v in run.varied.items()}
    return Run(run.detect_id, cfg, varied, run.detect_id)


def rebuild_rows(out: Path, rows: list[dict[str, Any]], runs: list[Run] | tuple[Run, ...]) -> list[dict[str, Any]]:
    """`rows` with the row of every run (and of its detection-only twin) that has a sound report
    taken from that report: the reports are the record, a results CSV is their table. So a CSV
    that was damaged, or lost a run killed between its report and its row, loses no result, and a
    digit flipped in a row is put right. Rows of other runs stay as they are, in their order;
    rows new to the CSV follow in spec order."""
    by_id = {r["run_id"]: r for r in rows}
    for run in runs:
        for r in (run, _detect_twin(run)):
            if r is not None and (row := report_row(out, r)) is not None:
                by_id[r.run_id] = row
    return list(by_id.values())


def table_columns(cols: list[str], rows: list[dict[str, Any]]) -> list[str]:
    """`cols`, then every other column the rows have: rows of another spec sharing the directory
    keep the fields it varies."""
    return list(dict.fromkeys([*cols, *(k for r in rows for k in r)]))


def results_path(out: Path, i: int, n: int) -> Path:
    return out / ("results.csv" if n == 1 else f"results-{i}-of-{n}.csv")


# -- running ------------------------------------------------------------------------------------
def run(spec_path: str | os.PathLike, out: str | os.PathLike, *, shard: tuple[int, int] = (0, 1),
        data_dir: str | os.PathLike | None = None, make_plots: bool = False,
        models_dir: str | os.PathLike | None = None, stack: int = 1,
        where: dict[str, list[str]] | None = None) -> Path:
    """Runs (or resumes) this shard of the sweep; returns its results CSV.

    where: run only the runs with these config values (`parse_where`); the summary covers every
    run of the spec that has a row, so a large sweep can be run piece by piece.
    models_dir: where the baselines and retrained models live (default: `out`); sweeps given
    the same one share every model they have in common.
    stack: train up to this many models as one program (`ci_jax.stack`): first the baselines the
    runs need, then the models they retrain; the runs then find them finished. The results are
    those of unstacked training up to float rounding.
    """
    from ci_jax import data, experiment  # late: spec errors come before jax starts

    raw = read_spec(spec_path)
    spec = expand(raw, where=f"sweep spec {spec_path}")
    i, n = shard
    check_shard(spec, i, n)
    if where:
        check_where(spec.runs, where)
    check_data_dirs(spec, data_dir)
    out = files.writable_dir(out, "--out")
    tqdm.write(f"{spec.name}: {len(spec.runs)} runs")
    csv_path = results_path(out, i, n)
    shard_all = shard_runs(spec.runs, i, n)
    try:
        rows, damage = read_rows(csv_path, columns(spec)), None
    except Damaged as e:
        rows, damage = [], str(e)
    # The CSV is a table of the runs' reports (see rebuild_rows): damaged, it is rebuilt from them.
    rows = rebuild_rows(out, rows, shard_all)
    done = {r["run_id"] for r in rows}
    mine = select(shard_all, where) if where else shard_all
    if where:
        tqdm.write(f"--where {where}: {len(mine)} of the shard's runs")
    # Every dataset the pending runs need, before any of them trains: a missing or broken data
    # dir for the second dataset must not surface hours into the first.
    pending = [r for r in mine if r.run_id not in done]
    datasets = {name: data.load(name, _data_dir(data_dir, name))
                for name in dict.fromkeys(r.cfg.data.dataset for r in pending)}
    # Every input is checked: only now does the sweep write.
    files.write_json(out / "sweep.json", {"spec": raw, "fields": list(spec.fields),
                                          "summary_fields": list(spec.summary_fields),
                                          "run_ids": [r.run_id for r in spec.runs],
                                          "detect_ids": [r.detect_id for r in spec.runs]})
    files.clear_stale_tmp(out, csv_path.name)
    if damage is not None:
        aside = set_aside(csv_path)
        tqdm.write(f"note: {csv_path} was damaged ({damage}); kept as {aside.name}, its rows rebuilt "
                   "from the runs' reports")
    cols = table_columns(columns(spec), rows)
    if rows or damage is not None:
        write_rows(csv_path, cols, rows)
    shared = Path(models_dir or out)
    with tqdm(total=len(mine), desc=f"{spec.name} shard {i}/{n}" if n > 1 else spec.name, unit="run") as bar:
        bar.update(len(mine) - len(pending))
        # Dataset by dataset when stacking (its prepared runs are held until they have run: the
        # poisoned sets of one dataset's baselines, not of every dataset's); in spec order otherwise.
        order = [[r for r in pending if r.cfg.data.dataset == name] for name in datasets] if stack > 1 else [pending]
        for runs in order:
            prepared = _prepared(runs, datasets, keep_all=stack > 1)
            if stack > 1 and runs:
                from ci_jax import stack as stack_lib

                prepared = list(prepared)
                stack_lib.train_runs(prepared, datasets[runs[0].cfg.data.dataset], shared, stack)
            for r, p in zip(runs, prepared):
                tqdm.write(f"run {r.run_id}: {r.varied}, seed {r.cfg.seed}")
                report = experiment.run(r.cfg, out / "runs" / r.run_id, dataset=datasets[r.cfg.data.dataset],
                                        make_plots=make_plots, shared_dir=shared, prepared=p)
                rows.append(row_of(r, report))
                write_rows(csv_path, cols, rows)
                done.add(r.run_id)
                bar.update()
    if n == 1:
        summarize(out)
    return csv_path


def _prepared(runs: list[Run], datasets: dict[str, Any], keep_all: bool) -> Iterator[Any]:
    """Each run's `experiment.prepare`, in order, each once; a run whose baseline an earlier one
    shares takes its poisoned sets. keep_all: every baseline's are held (a stacked sweep prepares
    one dataset's runs up front); else only the last one's."""
    from ci_jax import experiment

    held: dict[str, Any] = {}
    for r in runs:
        ds = datasets[r.cfg.data.dataset]
        key = config_lib.model_key(r.cfg, ds.sha256)
        p = experiment.prepare(r.cfg, ds, like=held.get(key))
        if not keep_all:
            held.clear()
        held[key] = p
        yield p


def merge(out: str | os.PathLike) -> Path:
    """Joins the shards' CSVs into results.csv (in spec order) and writes the summary. A damaged
    CSV is set aside and its rows are rebuilt from the runs' reports."""
    out = Path(out)
    meta = read_meta(out)
    spec = _spec_of(out, meta)
    need = ["run_id", *meta["fields"], "seed", *METRICS]
    by_id: dict[str, dict[str, Any]] = {}
    damaged: list[tuple[Path, str]] = []
    for path in sorted(out.glob("results-*-of-*.csv")) + [out / "results.csv"]:
        try:
            for row in read_rows(path, need):
                by_id.setdefault(row["run_id"], row)
        except Damaged as e:
            damaged.append((path, str(e)))
    by_id = {r["run_id"]: r for r in rebuild_rows(out, list(by_id.values()), spec.runs)}
    rows = [by_id.pop(i) for i in meta["run_ids"] if i in by_id]
    missing = len(meta["run_ids"]) - len(rows)
    rows += by_id.values()  # rows of other specs that share the directory stay
    for path, why in damaged:
        aside = set_aside(path)
        tqdm.write(f"note: {path} was damaged ({why}); kept as {aside.name}, its runs' rows rebuilt from their reports")
    if missing:
        tqdm.write(f"merge: {missing} of {len(meta['run_ids'])} runs have no row yet (shards unfinished?)")
    write_rows(out / "results.csv", table_columns(need, rows), rows)
    summarize(out)
    return out / "results.csv"


def _rewrite_hint(out: Path) -> str:
    return (f"rerun `ci-jax sweep SPEC --out {out} --shard 0/N` with the sweep's spec and N (its finished runs "
            "are skipped) to rewrite it, then merge")


def read_meta(out: Path) -> dict[str, Any]:
    """OUT/sweep.json, checked for the shape `run` writes. Unlike a results CSV it cannot be rebuilt
    from the runs (only the spec says which runs, fields and order a sweep has), so damage is a
    UserError that says how to write it again."""
    path = out / "sweep.json"
    if not path.is_file():
        raise UserError(f"{out} holds no sweep (sweep.json missing): run `ci-jax sweep SPEC --out {out}` first")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {path}: {files.os_reason(e)}") from None
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, an int beyond int()'s digits, absurd nesting
        raise UserError(f"{path} is damaged (not JSON: {errors.one_line(e, 80)}): {_rewrite_hint(out)}") from None
    problem = _meta_problem(meta)
    if problem:
        raise UserError(f"{path} is damaged ({problem}): {_rewrite_hint(out)}")
    return meta


def _meta_problem(meta: Any) -> str | None:
    names = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)
    if not isinstance(meta, dict):
        return f"a JSON {type(meta).__name__}, not an object"
    for key in ("fields", "summary_fields", "run_ids"):
        if not names(meta.get(key)):
            return f"{key} is not a list of names"
    if "detect_ids" in meta and not (names(meta["detect_ids"]) and len(meta["detect_ids"]) == len(meta["run_ids"])):
        return "detect_ids is not a list of names, one per run"
    if not isinstance(meta.get("spec"), dict):
        return "spec is not a mapping"
    if not set(meta["summary_fields"]) <= set(meta["fields"]) or len(set(meta["fields"])) != len(meta["fields"]):
        return "its fields do not fit together"
    return None


def _spec_of(out: Path, meta: dict[str, Any]) -> Spec:
    """The spec sweep.json holds, expanded: it must give the runs and fields the file lists, or a
    flipped byte inside it would merge the rows under another sweep's runs."""
    path = out / "sweep.json"
    try:
        spec = expand(meta["spec"], where=f"{path}: spec")
    except UserError as e:
        raise UserError(f"{path} is damaged ({errors.one_line(e, 120)}): {_rewrite_hint(out)}") from None
    detect_ids = meta.get("detect_ids")  # absent in sweeps from before detection-only twins
    if [r.run_id for r in spec.runs] != meta["run_ids"] or list(spec.fields) != meta["fields"] or \
            list(spec.summary_fields) != meta["summary_fields"] or \
            (detect_ids is not None and [r.detect_id for r in spec.runs] != detect_ids):
        raise UserError(f"{path} does not match the spec it holds (damaged, or written by another version of "
                        f"ci-jax): {_rewrite_hint(out)}")
    return spec


# -- summary ------------------------------------------------------------------------------------
def _number(text: str) -> float:
    return float(text) if text not in ("", None) else math.nan


def aggregate(rows: list[dict[str, str]], fields: list[str]) -> list[dict[str, Any]]:
    """One entry per combination of the varied fields: mean and std of each metric over seeds;
    `n`: the number of seeds behind each metric that fewer seeds than `seeds` have (say, only
    seed 0 retrained); `cell`: whether the attack is a backdoor to score (metrics.attack_cell_validity
    on the mean ASR and untriggered target rate over the seeds); `oracle`: what the defense knew
    of the ground truth (its report's word, else its variant's), None when nothing."""
    groups: dict[tuple, list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[f] for f in fields), []).append(row)
    table = []
    for key, members in groups.items():
        entry: dict[str, Any] = dict(zip(fields, key)) | {"seeds": len(members)}
        n = {}
        for m in METRICS:
            vals = np.array([_number(r.get(m, "")) for r in members])  # a CSV may predate a metric
            ok = vals[~np.isnan(vals)]
            # The sample standard deviation; none for one seed, where there is no spread to show.
            entry[m] = (float(ok.mean()), float(ok.std(ddof=1)) if ok.size > 1 else None) if ok.size else None
            if 0 < ok.size < len(members):
                n[m] = int(ok.size)
        mean = lambda m: None if entry[m] is None else entry[m][0]
        validity = metrics.attack_cell_validity(mean("asr_before"), mean("untriggered_before"))
        entry |= {"n": n, "cell": {"status": validity.status, "reason": validity.reason},
                  "oracle": _oracle(entry, members)}
        table.append(entry)
    return table


def _oracle(entry: dict[str, Any], members: list[dict[str, str]]) -> str | None:
    said = next((r["oracle"] for r in members if r.get("oracle")), None)
    variant = variants.VARIANTS.get(entry.get(VARIANT, ""))
    if said is None and variant is not None and variant.oracle:
        said = variant.knows or "the ground truth"
    return said


def markdown(table: list[dict[str, Any]], fields: list[str]) -> str:
    """The summary as a table, then its notes. An attack cell that is not a backdoor
    (metrics.attack_cell_validity) shows why in its `cell` column and none of the figures that
    would score a backdoor; a defense that used oracle knowledge is marked with a dagger."""
    percent = {"clean_before", "asr_before", "untriggered_before", "tpr", "fpr", "precision", *OPERATING_COLUMNS,
               "clean_after", "asr_after"}
    head = [*fields, "seeds", "cell", *METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    marked_field = next((f for f in (VARIANT, DEFENSE) if f in fields), fields[0] if fields else None)
    oracles: dict[str, str] = {}
    for e in table:
        cells = []
        for f in fields:
            cell = str(e[f])
            if f == marked_field and e.get("oracle"):
                oracles.setdefault(cell, e["oracle"])
                cell += f" {ORACLE_MARK}"
            cells.append(cell)
        status = e.get("cell", {}).get("status", "valid")
        cells += [str(e["seeds"]), status if status != "invalid" else f"invalid: {e['cell']['reason']}"]
        for m in METRICS:
            if status == "invalid" and m in SCORING:
                cells.append("-")
                continue
            if e[m] is None:
                cells.append("n/a")
                continue
            mean, std = e[m]
            scale, digits, unit = (100, 2, " %") if m in percent else (1, 4, "") if m == "auc" else (1, 0, "")
            spread = "" if std is None else f" ± {scale * std:.{digits}f}"
            count = e.get("n", {}).get(m)
            cells.append(f"{scale * mean:.{digits}f}{spread}{unit}" + ("" if count is None else f" (n={count})"))
        lines.append("| " + " | ".join(cells) + " |")
    points = ", ".join(f"{c}: TPR at FPR <= {100 * x:g} %" for c, x in zip(OPERATING_COLUMNS, metrics.OPERATING_POINTS))
    notes = [
        "Mean ± sample standard deviation over the seeds (`seeds` = n); one seed shows no ±, and (n=k) marks a "
        "figure that only k of the seeds have (e.g. after retraining).",
        f"`cell`: an attack is scored only if the baseline's ASR is >= {100 * metrics.VALID_ASR:g} % and the same "
        f"test images untriggered are taken for the target (`untriggered_before`) at most ASR/{metrics.UNTRIGGERED_SHARE}, "
        f"decided on the means over the seeds; an invalid cell shows `-` for {', '.join(SCORING)}; "
        "`no attack`: no backdoor to score (FPR only).",
        f"Operating points, from each defense's per-sample scores whatever its own rule removed: {points}.",
    ]
    notes += [f"{ORACLE_MARK} {name}: uses oracle knowledge ({what})" for name, what in oracles.items()]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def spec_rows(rows: list[dict[str, str]], meta: dict[str, Any]) -> list[dict[str, str]]:
    """The rows of this spec's runs, in spec order. A directory may hold other specs' rows too; a
    run not done yet is stood in for by its detection-only twin's row where there is one (say, a
    detection-only pass before the retraining one), which has no after-retraining figures."""
    by_id = {r["run_id"]: r for r in rows}
    twins = meta.get("detect_ids") or meta["run_ids"]
    picked = [by_id.get(rid) or by_id.get(did) for rid, did in zip(meta["run_ids"], twins)]
    return [r for r in picked if r is not None]


def summarize(out: str | os.PathLike) -> dict[str, Any]:
    """summary.md / summary.json (mean ± std over seeds, each cell's validity and oracle mark: see
    `aggregate`), a plot per varied field, and, when the defense (or its variant) varies, an attack
    x defense grid per dataset and an ROC plot per attack. summary.json keeps every figure of an
    invalid cell beside its status; summary.md and the grid do not score it."""
    from ci_jax import plots

    out = Path(out)
    meta = read_meta(out)
    fields = meta["summary_fields"]
    try:
        rows = spec_rows(read_rows(out / "results.csv", ["run_id", *meta["fields"], "seed", *METRICS]), meta)
    except Damaged as e:
        raise UserError(f"{out / 'results.csv'} is damaged ({e}): run `ci-jax merge {out}` to rebuild it "
                        "from the runs' reports") from None
    table = aggregate(rows, fields)
    files.write_json(out / "summary.json", {"fields": fields, "rows": table})
    files.write_text(out / "summary.md", markdown(table, fields))
    for field in fields:
        if field == "case":
            continue
        others = [f for f in fields if f != field]
        series: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for e in table:
            label = ", ".join(f"{f}={e[f]}" for f in others) or "all"
            series.setdefault(label, []).append((e[field], e))
        plots.sweep_field(out / "plots" / f"{field}.png", field, series,
                          ("tpr", "fpr", "clean_after", "asr_after"))
    defense = next((f for f in (VARIANT, DEFENSE) if f in fields), None)
    if defense is not None:  # a grid over defenses: the other summary fields name the attack
        _defense_grids(out, table, rows, fields, defense)
        _roc_per_attack(out, rows, [f for f in fields if f != defense], defense)
    elif DEFENSE in meta["fields"]:  # cases that set the defense: one curve per case
        attack = [f for f in meta["fields"] if f != "case" and not f.startswith("defense.")]
        _roc_per_attack(out, rows, attack, "case")
    return {"fields": fields, "rows": table}


def _roc_per_attack(out: Path, rows: list[dict[str, str]], attack_fields: list[str], label: str) -> None:
    """plots/roc_ATTACK.png: per attack (the values of `attack_fields`), one ROC curve per value of
    `label` (the defense, or the case), seeds pooled."""
    from ci_jax import metrics, plots

    by_attack: dict[str, dict[str, list[str]]] = {}
    for row in rows:
        attack = ", ".join(f"{f}={row[f]}" for f in attack_fields) or "attack"
        by_attack.setdefault(attack, {}).setdefault(row[label], []).append(row["run_id"])
    for attack, per_defense in by_attack.items():
        curves = {}
        for defense, run_ids in per_defense.items():
            score, truth = [], []
            for rid in run_ids:  # seeds pooled: one curve per defense
                scored = _defense_scores(out / "runs" / rid / "defense.npz")
                if scored is None:
                    tqdm.write(f"note: {out / 'runs' / rid / 'defense.npz'} is missing or damaged: "
                               f"ROC {attack}, {defense} is drawn without run {rid}")
                    continue
                score.append(scored[0])
                truth.append(scored[1])
            if not score:
                continue
            s, t = np.concatenate(score), np.concatenate(truth)
            if t.any() and not t.all():
                fpr, tpr = metrics.roc_curve(t, s)
                curves[defense] = (fpr, tpr, metrics.roc_auc(t, s))
        if curves:
            plots.roc(out / "plots" / f"roc_{_slug(attack)}.png", curves, title=f"ROC: {attack}")


def _defense_scores(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(score, is_poison) of a run's defense.npz, or None when it is missing, unreadable or of the
    wrong shape. The ROC plot is drawn from what the runs left: a run whose file is gone (shards
    run elsewhere, a damaged disk) leaves its curve, not the summary."""
    try:
        with np.load(path, allow_pickle=False) as z:
            score, idx = np.asarray(z["score"], np.float64), np.asarray(z["poison_idx"])
        if score.ndim != 1 or not np.isfinite(score).all() or idx.ndim != 1 or idx.size and (
                idx.dtype.kind not in "iu" or idx.min() < 0 or idx.max() >= len(score)):
            return None
    except Exception:  # noqa: BLE001 - a missing file, a bad zip, a missing array, a wrong dtype
        return None
    is_poison = np.zeros(len(score), bool)
    if idx.size:
        is_poison[idx] = True
    return score, is_poison


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def _defense_grids(out: Path, table: list[dict[str, Any]], rows: list[dict[str, str]], fields: list[str],
                   defense: str = DEFENSE) -> None:
    """plots/grid_DATASET.png: attack x defense, one figure per dataset. An attack is a summary
    row's other fields (its case label), less a leading dataset name, marked when its cell is
    invalid; a defense is its name or variant, marked when it used oracle knowledge."""
    from ci_jax import plots

    attack_fields = [f for f in fields if f != defense]
    dataset_of: dict[tuple, str] = {}
    for r in rows:
        dataset_of.setdefault(tuple(r[f] for f in attack_fields), r.get("data.dataset") or "all")
    grids: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for e in table:
        key = tuple(e[f] for f in attack_fields)
        dataset = dataset_of.get(key, "all")
        attack = ", ".join(map(str, key)) or "attack"
        attack = attack[len(dataset) + 1:] if attack.startswith(f"{dataset} ") else attack
        attack += " (invalid)" if e.get("cell", {}).get("status") == "invalid" else ""
        name = str(e[defense]) + (f" {ORACLE_MARK}" if e.get("oracle") else "")
        grids.setdefault(dataset, {})[(attack, name)] = e
    for dataset, cells in grids.items():
        attacks = list(dict.fromkeys(a for a, _ in cells))
        defenses = list(dict.fromkeys(d for _, d in cells))
        plots.defense_grid(out / "plots" / f"grid_{_slug(dataset)}.png", dataset, attacks, defenses, cells)
