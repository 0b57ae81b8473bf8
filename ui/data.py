"""The Data tab: upload a question/answer file, map its columns, check it, save it as a dataset version;
list and delete datasets."""
from __future__ import annotations

import re
import types
from pathlib import Path

import gradio as gr
import pandas as pd

from sft_core import StudioError
from sft_core.config import DataConfig, load_config
from sft_core.db import datasets as dataset_rows
from sft_core.studio import delete_dataset
from ui.common import _confirm, _hide, _path, admin_required, dataset_choices, studio, ui_errors


def _data_cfg(fmt: str, mapping: str) -> DataConfig:
    return load_config(DataConfig, overrides={"format": fmt or "auto", "mapping": mapping or {}})


# The Data tab's mapping dropdowns, one per canonical field (sft_core/mapping.py guesses their columns).
MAPPING_ROLES = (("instruction", "Question column"), ("response", "Answer column"),
                 ("context", "Context column (optional)"), ("system", "System prompt column (optional)"))


NOT_MAPPED = "(not used)"


ERROR_COLUMNS = ["file", "line", "field", "problem"]


def _in_ui_words(e: StudioError, file) -> str:
    """An error for the Data tab: the upload's temporary path becomes the file's own name."""
    text = str(e)
    path = _path(file) if file else ""
    return text.replace(path, Path(path).name) if path else text


def _name_from_file(path: str) -> str:
    """A dataset name from a file name: support-tickets.csv -> support-tickets."""
    stem = re.sub(r"[^A-Za-z0-9._+-]+", "-", Path(path).stem).strip("-._+")
    return stem[:60] or "dataset"


@ui_errors
def data_inspect(file, name):
    """After an upload: the first rows, the mapping dropdowns filled from the file's headers with
    guesses, the dataset name from the file name; Save waits for a passing Check. Outputs: message,
    preview, the four column dropdowns, mapping text, name, Save, report, problems."""
    from sft_core import mapping
    no_save, clear = gr.update(interactive=False), ("", pd.DataFrame(columns=ERROR_COLUMNS))
    if not file:
        empty = gr.update(choices=[NOT_MAPPED], value=NOT_MAPPED)
        return ("", gr.update(visible=False), *(empty,) * 4, "", gr.update(), no_save, *clear)
    try:
        info = mapping.inspect_file(_path(file), DataConfig())
    except StudioError as e:
        empty = gr.update(choices=[NOT_MAPPED], value=NOT_MAPPED)
        return ("❌ " + _in_ui_words(e, file), gr.update(visible=False), *(empty,) * 4, "", gr.update(), no_save,
                *clear)
    choices = [NOT_MAPPED, *info.columns]
    cols = [gr.update(choices=choices, value=info.guess.get(role, NOT_MAPPED)) for role, _ in MAPPING_ROLES]
    preview = pd.DataFrame([{c: mapping.preview_cell(r.get(c, "")) for c in info.columns} for r in info.rows],
                           columns=info.columns)
    if info.problems and not info.rows:
        msg = f"❌ **{info.name}** could not be read: " + "; ".join(info.problems)
    elif not info.needs_mapping:
        msg = (f"**{info.name}**: recognised as **{info.detected}** (columns {', '.join(info.columns)}). "
               "Press **Check**.")
    elif mapping.is_complete(info.guess):
        msg = (f"**{info.name}**: a table; columns matched by their names: {mapping.describe(info.guess)}. "
               "Change the columns below if that is wrong, then press **Check**.")
    else:
        msg = (f"**{info.name}**: a table with columns {', '.join(info.columns) or '(none)'}. Choose which column "
               "holds the question and which the answer, then press **Check**.")
    return (msg, gr.update(value=preview, visible=bool(info.rows)), *cols, mapping.to_text(info.guess),
            name or _name_from_file(info.name), no_save, *clear)


def data_mapping_text(instruction, response, context, system) -> tuple:
    """The dropdowns as mapping text (DataConfig.mapping); a new mapping needs a new Check before Save."""
    from sft_core import mapping
    chosen = {r: c for (r, _), c in zip(MAPPING_ROLES, (instruction, response, context, system))
              if c and c != NOT_MAPPED}
    return mapping.to_text(chosen), gr.update(interactive=False)


@ui_errors
def data_check(file, fmt, mapping):
    """Check a file without storing it: report, row-level problems, and Save enabled only when it passed."""
    from sft_core import data
    if not file:
        return "Choose a file first.", pd.DataFrame(columns=ERROR_COLUMNS), gr.update(interactive=False)
    try:
        report = data.check_file(_path(file), _data_cfg(fmt, mapping), ws=studio().ws)
    except StudioError as e:  # a bad mapping or format choice, an unreadable file: in words, with its name
        return "❌ " + _in_ui_words(e, file), pd.DataFrame(columns=ERROR_COLUMNS), gr.update(interactive=False)
    errors = pd.DataFrame([_issue_row(i) for i in report.errors], columns=ERROR_COLUMNS)
    from sft_core.render import format_report
    text = format_report(report)
    if report.ok:
        text += "\n\n✅ Ready: name the dataset and press **Save as dataset version**."
    return text, errors, gr.update(interactive=report.ok)


@ui_errors
def data_import(file, fmt, mapping, name, is_admin):
    """Store the file as a dataset version. A data problem is answered in the message line (the file's
    own name, nothing stored) and the versions table stays as it was."""
    from sft_core import data
    admin_required(is_admin)
    if not file:
        return "❌ Choose a file first.", gr.skip()
    if not name:
        return "❌ Give the dataset a name.", gr.skip()
    try:
        v = data.import_dataset(_path(file), name, _data_cfg(fmt, mapping), ws=studio().ws, store=studio().store)
    except StudioError as e:
        return "❌ Not saved: " + _in_ui_words(e, file), gr.skip()
    what = "saved new version" if v.created else "identical data: existing version reused"
    return f"✅ {what}: **{v.name}@{v.version}** — " + ", ".join(f"{k}: {n}" for k, n in v.splits.items()), datasets_table()


def datasets_table():
    from sft_core import data
    rows = data.list_datasets(ws=studio().ws, store=studio().store)
    out = []
    for r in rows:
        splits = ", ".join(f"{k} {v}" for k, v in (r.get("splits") or {}).items())
        out.append({"name": r["name"], "version": r["version"], "rows": r["n_rows"], "splits": splits,
                    "source": r.get("source")})
    return pd.DataFrame(out, columns=["name", "version", "rows", "splits", "source"])


@ui_errors
def dataset_delete_ask(name, is_admin):
    """First step of deleting a dataset: say what goes and show the confirmation buttons."""
    admin_required(is_admin)
    if not name:
        raise StudioError("choose a dataset to delete", "dataset")
    rows = dataset_rows.list_versions(studio().store, name)
    if not rows:
        raise StudioError(f"unknown dataset {name!r}", "dataset")
    return _confirm(True, f"Delete dataset **{name}** and all its {len(rows)} version(s) "
                          f"({sum(r['n_rows'] for r in rows)} rows)? Finished runs and evals keep their results. "
                          "This cannot be undone.")


@ui_errors
def dataset_delete(name, is_admin):
    admin_required(is_admin)
    if not name:
        raise StudioError("choose a dataset to delete", "dataset")
    n = delete_dataset(name, ws=studio().ws, store=studio().store)
    return (f"Deleted dataset **{name}** ({n} version(s)).", datasets_table(), gr.update(visible=False),
            gr.update(choices=dataset_choices(), value=None))


def _issue_row(i) -> dict:
    d = i if isinstance(i, dict) else getattr(i, "__dict__", {"message": str(i)})
    return {"file": Path(str(d.get("file") or "")).name, "line": d.get("line") or d.get("row"),
            "field": d.get("field"), "problem": d.get("message")}


def build(is_admin) -> types.SimpleNamespace:
    """The Data tab, wired. Returns what other tabs update: the versions table (a generated dataset lands
    there) and the dataset-to-delete picker (kept fresh by app.build_demo)."""
    with gr.Tab("Data", id="data"):
        gr.Markdown("Your own question/answer pairs: a CSV or JSONL (also JSON, Parquet) in any common shape "
                    "(question/answer, prompt/completion, alpaca, chat messages, ShareGPT). Upload, check the "
                    "columns, **Check**, then **Save**. The example dataset **pydocs** is ready already.")
        with gr.Row():
            d_file = gr.File(label="Dataset file", file_types=[".jsonl", ".json", ".csv", ".parquet"],
                             elem_id="data-file")
            with gr.Column():
                d_fmt = gr.Dropdown(["auto", "alpaca", "prompt_completion", "messages", "sharegpt", "table"],
                                    value="auto", label="Format", elem_id="data-format",
                                    info="auto recognises the record formats; any other table uses the "
                                         "columns chosen below")
                d_cols = []
                for i in range(0, len(MAPPING_ROLES), 2):
                    with gr.Row():
                        d_cols += [gr.Dropdown([NOT_MAPPED], value=NOT_MAPPED, label=label, min_width=160,
                                               elem_id=f"data-col-{role}")
                                   for role, label in MAPPING_ROLES[i:i + 2]]
                # the dropdowns as text: what data_check / data_import take (also over the API)
                d_map = gr.Textbox(visible=False, elem_id="data-mapping")
                d_name = gr.Textbox(label="Dataset name", elem_id="data-name")
        d_msg = gr.Markdown(elem_id="data-msg")
        d_preview = gr.Dataframe(label="First rows of the file", interactive=False, visible=False,
                                 wrap=True, max_height=260, elem_id="data-preview")
        with gr.Row():
            d_check = gr.Button("Check", variant="primary", elem_id="data-check")
            d_save = gr.Button("Save as dataset version", variant="primary", interactive=False,
                               elem_id="data-save")
        d_report = gr.Markdown(elem_id="data-report")
        d_errors = gr.Dataframe(pd.DataFrame(columns=ERROR_COLUMNS),
                                label="Row-level problems", interactive=False, elem_id="data-errors")
        d_table = gr.Dataframe(datasets_table, label="Dataset versions", interactive=False,
                               elem_id="data-versions")
        with gr.Row(elem_id="data-delete-row"):
            d_del_pick = gr.Dropdown(dataset_choices(), value=None, allow_custom_value=True, scale=3,
                                     label="Dataset to delete (all versions)", elem_id="data-delete-pick")
            d_del = gr.Button("Delete dataset…", size="sm", scale=0, min_width=140, elem_id="data-delete")
        with gr.Row(visible=False, elem_id="data-delete-confirm") as d_del_row:
            d_del_q = gr.Markdown(elem_id="data-delete-question")
            d_del_yes = gr.Button("Yes, delete", variant="stop", elem_id="data-delete-yes")
            d_del_no = gr.Button("Keep it", elem_id="data-delete-no")
    d_check.click(data_check, [d_file, d_fmt, d_map], [d_report, d_errors, d_save])
    d_save.click(data_import, [d_file, d_fmt, d_map, d_name, is_admin], [d_msg, d_table])
    d_file.change(data_inspect, [d_file, d_name], [d_msg, d_preview, *d_cols, d_map, d_name, d_save, d_report,
                                                   d_errors], api_visibility="private")
    for col in d_cols:  # a new mapping needs a new Check before Save
        col.input(data_mapping_text, d_cols, [d_map, d_save], api_visibility="private", show_progress="hidden")
    d_fmt.input(lambda: gr.update(interactive=False), None, d_save, api_visibility="private",
                show_progress="hidden")
    d_del.click(dataset_delete_ask, [d_del_pick, is_admin], [d_del_row, d_del_q])
    d_del_yes.click(dataset_delete, [d_del_pick, is_admin], [d_msg, d_table, d_del_row, d_del_pick])
    d_del_no.click(_hide, None, d_del_row, api_visibility="private")
    d_del_pick.change(_hide, None, d_del_row, api_visibility="private")  # confirm only what was asked
    return types.SimpleNamespace(table=d_table, del_pick=d_del_pick)
