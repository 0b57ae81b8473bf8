"""Preference datasets: (prompt, chosen, rejected) pairs from the studio's own evidence or from a file.

Three sources, one policy:

* ``build_from_campaign``: a rating campaign's blind votes. A ``left`` / ``right`` vote is one pair (the
  chosen side's output as ``chosen``). ``tie`` and ``both_bad`` say nothing about direction and are
  skipped (counted).
* ``build_from_judge``: an eval's LLM-judge pairwise verdicts (``judge.jsonl``). Only position-consistent
  verdicts count (the same winner with the answers in both orders: ``a`` / ``b``); ``tie`` and
  ``inconsistent`` are skipped (counted).
* ``build_from_file``: a file in TRL's preference format, plain (``prompt``, ``chosen``, ``rejected``
  strings) or conversational (message lists; ``prompt`` may be left implicit as the shared start of
  ``chosen`` and ``rejected``). A plain prompt becomes one user turn, so pairs train under the model's
  chat template, as SFT runs and the engines use it. Any invalid row (missing field, wrong type, an
  empty side) blocks the import with its line; nothing is stored.

Then, for every source: a pair with an empty side or whose chosen equals rejected is skipped (counted);
rows with the same prompt and the same two answers are one pair, and the direction most of them give
wins (the agreeing extra rows are counted as duplicates); an even split is a *conflict* and that pair is
dropped (counted). A source that leaves no pair is an error; nothing is stored.

Prompts: for votes and verdicts the prompt is the eval row's record in the format adapters are
trained and prompted in (``records.prompt_messages``: its own system turn, the instruction with its
context), so a preference run continues an SFT adapter in its own format; when the eval's dataset is
gone, the text the raters saw becomes one user turn (counted as ``prompts_from_task_text``).

Splits: ``train`` and ``eval`` (held-out pairs for the held-out reward accuracy), by prompt (every pair of
one prompt in the same split), seeded. *Leakage*: pairs whose prompt is a row of a held-out split (not
train) of the source eval's dataset (or ``against`` for a file) are counted per split. A campaign's and a
judge's pairs all come from the eval's own split: measure the preference run on another split.

A pair is one JSON line: ``{"id", "prompt": [messages], "chosen": str, "rejected": str, "meta": {...}}``.
Versions are stored through ``data.import_records`` (content hash, splits, manifest, report, a
``datasets`` row) with format ``"preference"``: the kind marker. SFT training refuses these versions
(``refuse_for_sft``); preference training requires them (``require_preference``).
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from sft_core import StudioError
from sft_core.config import DataConfig
from sft_core.db import evals as eval_rows, ratings as rating_rows
from sft_core.store import Store, loads, open_store
from sft_core.workspace import Workspace, read_jsonl, safe_name, sha256_json

KIND = "preference"  # the dataset format / kind marker in manifest.json
SPLITS = ("train", "eval")
POLICY = ("votes: left/right = one pair each, tie and both_bad skipped; judge: position-consistent a/b "
          "verdicts only, tie and inconsistent skipped; pairs with an empty side or chosen == rejected skipped; "
          "rows with the same prompt and answers merged, the majority direction kept, an even split dropped "
          "as a conflict; splits by prompt")


class PreferenceError(StudioError):
    pass


# ------------------------------------------------------------------------------------------------
# The kind marker
# ------------------------------------------------------------------------------------------------
def dataset_kind(dv) -> str:
    """``"preference"`` for a preference dataset version, else ``"sft"`` (from its manifest's format)."""
    try:
        manifest = json.loads((Path(dv.path) / "manifest.json").read_text())
    except (OSError, ValueError):
        return "sft"
    return KIND if manifest.get("format") == KIND else "sft"


def refuse_for_sft(dv) -> None:
    """SFT training's check: a preference dataset has no single answer to imitate."""
    from sft_core.config import ConfigError
    if dataset_kind(dv) == KIND:
        raise ConfigError(f"{dv.name}@{dv.version} is a preference dataset (prompt/chosen/rejected pairs); train on it "
                          "with `sft-studio pref train --dataset NAME` (preference tuning), not SFT", "dataset")


def require_preference(name: str, version: str | None = None, *, ws: Workspace,
                       store: Store | None = None):
    """The dataset version, if it is a preference dataset (else an error naming what to do)."""
    from sft_core import data
    from sft_core.config import ConfigError
    try:
        dv = data.get_version(name, version or None, ws=ws, store=store)
    except StudioError as e:
        raise ConfigError(e.message, "dataset") from None
    if dataset_kind(dv) != KIND:
        raise ConfigError(f"{dv.name}@{dv.version} is an instruction (SFT) dataset; preference training needs pairs: "
                          "build them with `sft-studio pref build --campaign C | --eval E --from judge | --file F`",
                          "dataset")
    return dv


def load_pairs(name: str, split: str, version: str | None = None, *, ws: Workspace,
               store: Store | None = None) -> list[dict]:
    """The pairs of one split ([] when the version has no such split, e.g. no held-out pairs)."""
    dv = require_preference(name, version, ws=ws, store=store)
    p = dv.path / f"{safe_name(split, 'split')}.jsonl"
    return read_jsonl(p) if p.exists() else []


def to_trl(pairs: list[dict]):
    """TRL's conversational preference format: prompt messages, one assistant message per side."""
    from datasets import Dataset
    return Dataset.from_list([{"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])


# ------------------------------------------------------------------------------------------------
# From raw rows (one per vote, verdict or file line) to a stored version
# ------------------------------------------------------------------------------------------------
def _prompt_key(prompt: list[dict]) -> str:
    """The normalised text of the last user turn: what leakage and the split group by."""
    from sft_core.data import normalised_key
    last = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    return normalised_key({"instruction": last, "context": None})


def aggregate(raw: list[dict], counts: Counter) -> list[dict]:
    """Raw rows ``{"prompt", "chosen", "rejected", "meta"}`` -> pairs, by the policy in the module docstring.

    ``counts`` gets ``empty_side``, ``identical``, ``duplicates``, ``conflicting_pairs`` and ``conflicting_rows``."""
    for key in ("empty_side", "identical", "duplicates", "conflicting_pairs", "conflicting_rows", "outvoted_rows"):
        counts.setdefault(key, 0)  # every count in every report, zeros too
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in raw:
        if not r["chosen"].strip() or not r["rejected"].strip():
            counts["empty_side"] += 1
            continue
        if r["chosen"].strip() == r["rejected"].strip():
            counts["identical"] += 1
            continue
        key = (sha256_json(r["prompt"]), *sorted((r["chosen"], r["rejected"])))
        groups[key].append(r)
    pairs = []
    for rows in groups.values():
        by_winner = Counter(r["chosen"] for r in rows)
        (top, n_top), *rest = by_winner.most_common()
        if rest and rest[0][1] == n_top:
            counts["conflicting_pairs"] += 1
            counts["conflicting_rows"] += len(rows)
            continue
        agree = [r for r in rows if r["chosen"] == top]
        counts["duplicates"] += len(agree) - 1
        counts["outvoted_rows"] += len(rows) - len(agree)
        first = agree[0]
        meta = dict(first["meta"])
        if len(rows) > 1:
            meta |= {"rows_for": len(agree), "rows_against": len(rows) - len(agree)}
        pair = {"prompt": first["prompt"], "chosen": first["chosen"], "rejected": first["rejected"], "meta": meta}
        pairs.append({"id": sha256_json({k: pair[k] for k in ("prompt", "chosen", "rejected")})[:16], **pair})
    return pairs


def split_pairs(pairs: list[dict], eval_fraction: float, seed: int) -> dict[str, list[dict]]:
    """Seeded split by prompt (data.split_records' rule: at least one held-out prompt once there are 3)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for p in pairs:
        groups[_prompt_key(p["prompt"])].append(p)
    keys = sorted(groups, key=lambda k: sha256_json([seed, k]))
    n = len(keys)
    n_eval = int(round(n * eval_fraction)) if n >= 3 else 0
    if n >= 3 and eval_fraction > 0:
        n_eval = max(1, n_eval)
    return {"train": [p for k in keys[n_eval:] for p in groups[k]],
            "eval": [p for k in keys[:n_eval] for p in groups[k]]}


def leakage(pairs: list[dict], dataset: str | None, version: str | None, ws: Workspace, store: Store) -> dict:
    """{split: pairs whose prompt is a row of that held-out split} for ``dataset@version`` (train is not counted:
    preference pairs on training prompts are expected)."""
    from sft_core import data
    from sft_core.records import user_content
    if not dataset:
        return {}
    try:
        dv = data.get_version(dataset, version or None, ws=ws, store=store)
    except StudioError:
        return {}
    keys = Counter(_prompt_key(p["prompt"]) for p in pairs)
    out = {}
    for split in sorted(dv.splits):
        if split == "train" or not dv.splits.get(split):
            continue
        rows = data.load_split(dv.name, split, dv.version, ws=ws, store=store)
        row_keys = {data.normalised_key({"instruction": user_content(r), "context": None}) for r in rows}
        out[f"{dv.name}@{dv.version}:{split}"] = sum(n for k, n in keys.items() if k in row_keys)
    return out


def _token_stats(pairs: list[dict], model: str, ws: Workspace) -> dict | None:
    """Lengths in the model's tokens (prompt; prompt + the longer side), to choose max_length."""
    try:
        from sft_core.models import load_tokenizer, resolve_model
        tok = load_tokenizer(resolve_model(model, ws))
    except StudioError:
        return None
    prompt_n, total_n = [], []
    for p in pairs:
        n = len(tok.apply_chat_template(p["prompt"], tokenize=True, add_generation_prompt=True,
                                        return_dict=True)["input_ids"])
        longer = max(p["chosen"], p["rejected"], key=len)
        prompt_n.append(n)
        total_n.append(n + len(tok(longer, add_special_tokens=False)["input_ids"]) + 2)  # + end of turn

    def summary(v):
        s = sorted(v)
        return {"max": s[-1], "p95": s[min(len(s) - 1, int(len(s) * 0.95))], "mean": round(sum(s) / len(s), 1)}
    return {"model": model, "prompt": summary(prompt_n), "prompt_plus_longer_side": summary(total_n)} if pairs else None


def _store_version(name: str, raw: list[dict], counts: Counter, source: dict, source_label: str,
                   eval_fraction: float, seed: int, against: tuple[str | None, str | None], ws: Workspace,
                   store: Store, cfg: DataConfig | None = None):
    from sft_core import data
    safe_name(name, "name")
    cfg = cfg or DataConfig()
    if not 0 <= eval_fraction < 1:
        raise PreferenceError(f"must be in [0, 1), got {eval_fraction}", "eval_fraction")
    pairs = aggregate(raw, counts)
    if not pairs:
        why = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v) or "no rows"
        raise PreferenceError(f"no preference pairs left ({why}); nothing stored", source_label)
    splits = split_pairs(pairs, eval_fraction, seed)
    if not splits["train"]:
        raise PreferenceError("every pair landed in the eval split; lower eval_fraction; nothing stored",
                              "eval_fraction")
    leak = leakage(pairs, against[0], against[1], ws, store)
    warnings = []
    if any(leak.values()):
        warnings.append("some pairs' prompts are rows of a held-out split (see leakage): measure the preference run "
                        "on a split they do not come from")
    if counts.get("conflicting_pairs"):
        warnings.append(f"{counts['conflicting_pairs']} pair(s) had as many rows for one side as for the other and "
                        "were dropped")
    report = {"ok": True, "kind": KIND, "policy": POLICY, "source": source, "pairs": len(pairs),
              "splits": {s: len(v) for s, v in splits.items()}, "counts": dict(sorted(counts.items())),
              "leakage": leak, "tokens": _token_stats(pairs, cfg.model, ws), "warnings": warnings}
    return data.import_records(splits, name, cfg=DataConfig(eval_fraction=eval_fraction, test_fraction=0.0, seed=seed,
                                                            model=cfg.model),
                               ws=ws, store=store, source=source_label, report=report, fmt=KIND)


def _ctx(ws: Workspace, store: Store | None) -> tuple[Workspace, Store]:
    return ws, store or open_store(ws.db_url)


def _eval_prompts(ev: dict, ws: Workspace, store: Store) -> dict[str, list[dict]]:
    """row id -> prompt messages (the adapter format) from the eval's dataset split; {} when it is gone."""
    from sft_core import data
    from sft_core.records import prompt_messages
    cfg = loads(ev["config"], {}) or {}
    if not cfg.get("dataset"):
        return {}
    try:
        rows = data.load_split(cfg["dataset"], cfg.get("split", "test"), cfg.get("dataset_version"), ws=ws, store=store)
    except StudioError:
        return {}
    return {r["id"]: prompt_messages(r) for r in rows}


def _eval(store: Store, eval_id: str) -> dict:
    ev = eval_rows.get(store, eval_id)
    if ev is None:
        raise PreferenceError(f"unknown eval {eval_id!r}", "eval")
    return ev


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------
def build_from_campaign(campaign_id: str, name: str, eval_fraction: float = 0.1, seed: int = 42, *,
                        ws: Workspace, store: Store | None = None, cfg: DataConfig | None = None):
    """A preference dataset version from a campaign's decisive votes. Returns data.DatasetVersion."""
    from evals import rating
    ws, store = _ctx(ws, store)
    safe_name(name, "name")
    camp = rating.get_campaign(campaign_id, ws=ws, store=store)
    votes = rating_rows.votes_with_tasks(store, campaign_id, texts=True)
    counts = Counter(votes=len(votes))
    decisive = [v for v in votes if v["choice"] in ("left", "right")]
    for v in votes:
        if v["choice"] not in ("left", "right"):
            counts[v["choice"]] += 1
    if not decisive:
        raise PreferenceError(f"campaign {campaign_id} has no decisive votes ({len(votes)} votes: "
                              f"{counts['tie']} tie, {counts['both_bad']} both_bad); nothing stored", "campaign")
    ev = _eval(store, camp["eval_id"])
    prompts = _eval_prompts(ev, ws, store)
    raw = []
    for v in decisive:
        side, other = ("left", "right") if v["choice"] == "left" else ("right", "left")
        prompt = prompts.get(v["row_id"])
        if prompt is None:
            counts["prompts_from_task_text"] += 1
            prompt = [{"role": "user", "content": v["prompt"]}]
        raw.append({"prompt": prompt, "chosen": v[f"output_{side}"], "rejected": v[f"output_{other}"],
                    "meta": {"source": "campaign", "campaign": campaign_id, "eval": camp["eval_id"],
                             "row_id": v["row_id"], "task_id": v["task_id"],
                             "chosen_system": v[f"system_{side}"], "rejected_system": v[f"system_{other}"]}})
    ecfg = loads(ev["config"], {}) or {}
    source = {"kind": "campaign", "campaign": campaign_id, "campaign_name": camp["name"], "eval": camp["eval_id"],
              "eval_dataset": ecfg.get("dataset"), "eval_dataset_version": ecfg.get("dataset_version"),
              "eval_split": ecfg.get("split"), "base_model": ecfg.get("base_model"), "systems": loads(camp["systems"])}
    return _store_version(name, raw, counts, source, f"campaign:{campaign_id}", eval_fraction, seed,
                          (ecfg.get("dataset"), ecfg.get("dataset_version")), ws, store, cfg)


def judge_identity(eval_cfg: dict) -> str:
    """Who judged an eval: ``local:<base model>`` or ``<model> @ <endpoint>``."""
    where = eval_cfg.get("judge")
    if where in (True, "local"):
        return f"local:{eval_cfg.get('base_model')}"
    return f"{eval_cfg.get('judge_model') or 'default'} @ {where}"


def build_from_judge(eval_id: str, name: str, eval_fraction: float = 0.1, seed: int = 42, *,
                     ws: Workspace, store: Store | None = None, cfg: DataConfig | None = None):
    """A preference dataset version from an eval's position-consistent judge verdicts."""
    ws, store = _ctx(ws, store)
    safe_name(name, "name")
    ev = _eval(store, eval_id)
    path = Path(ev["path"])
    verdicts = [j for j in read_jsonl(path / "judge.jsonl") if "winner" in j]
    if not verdicts:
        raise PreferenceError(f"eval {eval_id} has no pairwise judge verdicts (run it with --judge); nothing stored",
                              "eval")
    counts = Counter(verdicts=len(verdicts))
    by_key = {(o["row_id"], o["system"]): o for o in read_jsonl(path / "outputs.jsonl") if o.get("set") == "domain"}
    prompts = _eval_prompts(ev, ws, store)
    ecfg = loads(ev["config"], {}) or {}
    judge = judge_identity(ecfg)
    raw = []
    for j in verdicts:
        if j["winner"] not in ("a", "b"):
            counts[j["winner"]] += 1
            continue
        win, lose = (j["system_a"], j["system_b"]) if j["winner"] == "a" else (j["system_b"], j["system_a"])
        ow, ol = by_key.get((j["row_id"], win)), by_key.get((j["row_id"], lose))
        if ow is None or ol is None:
            counts["missing_output"] += 1
            continue
        prompt = prompts.get(j["row_id"])
        if prompt is None:
            counts["prompts_from_task_text"] += 1
            text = ow["instruction"] + (f"\n\nContext:\n{ow['context']}" if ow.get("context") else "")
            prompt = [{"role": "user", "content": text}]
        raw.append({"prompt": prompt, "chosen": ow["output"], "rejected": ol["output"],
                    "meta": {"source": "judge", "eval": eval_id, "row_id": j["row_id"], "judge": judge,
                             "chosen_system": win, "rejected_system": lose}})
    if not any(j["winner"] in ("a", "b") for j in verdicts):
        raise PreferenceError(f"eval {eval_id} has no position-consistent judge verdicts ({counts['tie']} tie, "
                              f"{counts['inconsistent']} inconsistent); nothing stored", "eval")
    source = {"kind": "judge", "eval": eval_id, "judge": judge, "eval_dataset": ecfg.get("dataset"),
              "eval_dataset_version": ecfg.get("dataset_version"), "eval_split": ecfg.get("split"),
              "base_model": ecfg.get("base_model"), "systems": ecfg.get("systems")}
    return _store_version(name, raw, counts, source, f"eval:{eval_id}:judge", eval_fraction, seed,
                          (ecfg.get("dataset"), ecfg.get("dataset_version")), ws, store, cfg)


def _messages(value, f: str, n: int, field: str, issues: list) -> list[dict] | None:
    from sft_core.data import Issue
    if not isinstance(value, list) or not value:
        issues.append(Issue(f, n, field, "expected a non-empty list of {role, content} messages"))
        return None
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            issues.append(Issue(f, n, f"{field}[{i}]", "expected a message {\"role\": str, \"content\": str}"))
            return None
        if m["role"] not in ("system", "user", "assistant"):
            issues.append(Issue(f, n, f"{field}[{i}]", f"unknown role {m['role']!r} (system, user or assistant)"))
            return None
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _answer(msgs: list[dict], f: str, n: int, field: str, issues: list) -> str | None:
    from sft_core.data import Issue
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        issues.append(Issue(f, n, field, "expected exactly one assistant message after the prompt"))
        return None
    return msgs[0]["content"]


def parse_file_row(row: dict, f: str, n: int, issues: list) -> dict | None:
    """One TRL preference row (plain or conversational, prompt explicit or implicit) -> a raw row, or issues."""
    from sft_core.data import Issue
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        issues.append(Issue(f, n, None, f"missing {' and '.join(missing)}: expected TRL's prompt/chosen/rejected "
                                        f"fields (got {', '.join(list(row)[:6])[:200]})"))
        return None
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):  # plain
        if not isinstance(prompt, str):
            issues.append(Issue(f, n, "prompt", "plain pairs need a prompt string"))
            return None
        prompt_msgs = [{"role": "user", "content": prompt}]
    elif isinstance(chosen, list) and isinstance(rejected, list):  # conversational
        c = _messages(chosen, f, n, "chosen", issues)
        r = _messages(rejected, f, n, "rejected", issues)
        if c is None or r is None:
            return None
        if prompt is None:  # implicit prompt: the shared start of both conversations
            k = 0
            while k < min(len(c), len(r)) - 1 and c[k] == r[k]:
                k += 1
            prompt_msgs, c, r = c[:k], c[k:], r[k:]
        elif isinstance(prompt, str):
            prompt_msgs = [{"role": "user", "content": prompt}]
        else:
            prompt_msgs = _messages(prompt, f, n, "prompt", issues)
            if prompt_msgs is None:
                return None
        chosen, rejected = _answer(c, f, n, "chosen", issues), _answer(r, f, n, "rejected", issues)
        if chosen is None or rejected is None:
            return None
    else:
        issues.append(Issue(f, n, "chosen", "chosen and rejected must both be strings (plain) or both message lists "
                                            "(conversational)"))
        return None
    if not prompt_msgs or prompt_msgs[-1]["role"] != "user" or not prompt_msgs[-1]["content"].strip():
        issues.append(Issue(f, n, "prompt", "the prompt must end with a non-empty user turn"))
        return None
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            issues.append(Issue(f, n, field, f"empty {field} answer: a pair needs two answers"))
            return None
    return {"prompt": prompt_msgs, "chosen": chosen, "rejected": rejected, "meta": {"source": "file", "line": n}}


def build_from_file(path: str | Path, name: str, eval_fraction: float = 0.1, seed: int = 42,
                    against: str | None = None, *, ws: Workspace, store: Store | None = None,
                    cfg: DataConfig | None = None):
    """A preference dataset version from a TRL-format file (JSONL, JSON, CSV, Parquet, a saved `datasets` dir).

    ``against``: a dataset whose held-out splits the pairs' prompts are checked against (leakage)."""
    from sft_core import data
    ws, store = _ctx(ws, store)
    safe_name(name, "name")
    cfg = cfg or DataConfig()
    cfg.validate()
    issues: list = []
    f = str(path)
    raw = []
    for n, row in data.read_rows(Path(path), issues, cfg):  # the data module's reader: its limits and line numbers
        r = parse_file_row(row, f, n, issues)
        if r is not None:
            raw.append(r)
    errors = [i for i in issues if i.severity == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise PreferenceError(f"invalid preference data, nothing stored: {errors[0]}{more}", f)
    if not raw:
        raise PreferenceError("no preference pairs found, nothing stored", f)
    if against:
        data.get_version(against, None, ws=ws, store=store)  # an unknown dataset is an error, not "no leakage"
    counts = Counter(rows=len(raw))
    source = {"kind": "file", "file": Path(path).name, "against": against}
    return _store_version(name, raw, counts, source, Path(path).name, eval_fraction, seed, (against, None), ws, store,
                          cfg)


# ------------------------------------------------------------------------------------------------
# Reading a version's report (CLI, UI)
# ------------------------------------------------------------------------------------------------
def report(name: str, version: str | None = None, *, ws: Workspace, store: Store | None = None) -> dict:
    dv = require_preference(name, version, ws=ws, store=store)
    return json.loads((dv.path / "report.json").read_text()) | {"name": dv.name, "version": dv.version}


def format_report(rep: dict) -> str:
    """Markdown summary of a preference dataset's report (CLI and UI)."""
    src = rep.get("source", {})
    origin = {"campaign": lambda s: f"campaign {s['campaign']} of eval {s['eval']}",
              "judge": lambda s: f"judge {s['judge']} on eval {s['eval']}",
              "file": lambda s: f"file {s['file']}"}.get(src.get("kind"), lambda s: "unknown source")(src)
    head = f"### {rep.get('name', '')}@{rep.get('version', '')} — {rep['pairs']} preference pairs from {origin}"
    lines = [head, "",
             "- splits: " + ", ".join(f"{k} {v}" for k, v in rep["splits"].items()),
             "- counts: " + (", ".join(f"{k} {v}" for k, v in rep["counts"].items()) or "none"),
             "- leakage (pairs whose prompt is in a held-out split): "
             + (", ".join(f"{k} {v}" for k, v in rep["leakage"].items()) or "not checked")]
    if rep.get("tokens"):
        t = rep["tokens"]
        lines.append(f"- tokens ({t['model']}): prompt max {t['prompt']['max']}, prompt + longer answer p95 "
                     f"{t['prompt_plus_longer_side']['p95']} / max {t['prompt_plus_longer_side']['max']}")
    lines.append(f"- policy: {rep['policy']}")
    lines += [f"- ⚠ {w}" for w in rep.get("warnings", [])]
    return "\n".join(lines)

