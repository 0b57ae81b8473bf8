"""The Train tab's forms: the SFT run's options (TrainConfig: presets, the RAFT box, the advanced groups) and the
preference run's (PreferenceConfig), in people's words; and the handlers that only change the forms."""
from __future__ import annotations

import types

import gradio as gr

from sft_core import guide
from sft_core.config import fields_for_form
from ui.common import (
    _form_component, dataset_choices, finished_runs, kb_choices, preference_dataset_choices, studio,
)


def _train_config_cls():
    from sft_core.config import TrainConfig
    return TrainConfig


TRAIN_FORM_SKIP = ("dataset", "dataset_version", "base_model")


# TrainConfig fields shown only in raft mode (the Train tab's RAFT box); in sft mode they are not sent
RAFT_FIELDS = ("kb", "raft_distractors", "raft_oracle_drop", "raft_cite", "raft_context_tokens")


# what a preset leaves alone: the run's name, how it is trained and the RAFT choices (raft_context_tokens, paired
# with max_length, follows the preset)
PRESET_KEEPS = ("run_name", "mode", "kb", "raft_distractors", "raft_oracle_drop", "raft_cite")


def train_form_fields() -> list[dict]:
    return [f for f in fields_for_form(_train_config_cls()) if f["name"] not in TRAIN_FORM_SKIP]


def _pref_config_cls():
    from sft_core.config import PreferenceConfig
    return PreferenceConfig


# PreferenceConfig fields the preference form takes from its own dropdowns (dataset, starting run), or leaves to
# them (the base model is the starting run's own; the latest dataset version)
PREF_FORM_SKIP = ("dataset", "dataset_version", "from_run", "base_model")


def pref_form_fields() -> list[dict]:
    return [f for f in fields_for_form(_pref_config_cls()) if f["name"] not in PREF_FORM_SKIP]


# The Train tab's Advanced fields: people's words for the TrainConfig names, and their sections.
TRAIN_LABELS = {
    "run_name": "Run name", "lora_r": "LoRA rank (r)", "lora_alpha": "LoRA alpha", "lora_dropout": "LoRA dropout",
    "target_modules": "Target modules", "use_rslora": "Rank-stabilised scaling (rsLoRA)",
    "learning_rate": "Learning rate", "lr_scheduler": "Learning-rate schedule", "warmup_ratio": "Warm-up share",
    "epochs": "Epochs", "max_steps": "Max steps (0 = epochs)", "batch_size": "Batch size",
    "grad_accum": "Gradient accumulation", "max_length": "Max length (tokens)", "packing": "Packing",
    "group_by_length": "Group by length", "completion_only_loss": "Loss on the answer only", "seed": "Seed",
    "eval_steps": "Evaluate every N steps", "save_steps": "Save steps (checkpoint interval)",
    "early_stopping_patience": "Early-stopping patience", "logging_steps": "Log every N steps",
    "load_in_4bit": "4-bit base model (QLoRA)", "gradient_checkpointing": "Gradient checkpointing",
    "num_gpus": "GPUs", "report_to": "Extra logger",
    # retrieval-aware fine-tuning (RAFT), shown in raft mode
    "mode": "Training prompts", "kb": "Knowledge base (the passages)", "raft_distractors": "Distractor passages",
    "raft_oracle_drop": "Share without the right passage", "raft_cite": "Answers cite their passage",
    "raft_context_tokens": "Passage budget (tokens)",
    # preference tuning (PreferenceConfig)
    "loss_type": "Preference loss", "beta": "Beta (distance from the reference)", "label_smoothing": "Label smoothing",
}


SFT_MODE, PREF_MODE = "SFT (instruction data)", "Preference (from votes)"


TRAIN_MODE_WORDS = {"sft": "Plain: each question as it is", "raft": "RAFT: each question with retrieved passages"}


RAFT_NOTE = ("**RAFT** (retrieval-aware fine-tuning): each training question comes with passages from the knowledge "
             "base — the one its answer is in plus distractors, and for a share of rows only distractors — built "
             "exactly as the `raft:RUN` system prompts at inference, so the adapter learns to use retrieved passages "
             "and to ignore the wrong ones. Best on a dataset generated from the same knowledge base (Knowledge tab).")


TRAIN_GROUPS = [
    ("Run", ["run_name", "seed"]),
    ("Length of training", ["epochs", "max_steps", "early_stopping_patience", "eval_steps"]),
    ("LoRA", ["lora_r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora"]),
    ("Optimiser", ["learning_rate", "lr_scheduler", "warmup_ratio"]),
    ("Batches", ["batch_size", "grad_accum", "max_length", "packing", "group_by_length", "completion_only_loss"]),
    ("Checkpoints and logs", ["save_steps", "logging_steps", "report_to"]),
    ("Hardware", ["load_in_4bit", "gradient_checkpointing", "num_gpus"]),
]


def train_mode(mode):
    """The Train tab's mode: the SFT form and its Start button, or the preference form."""
    pref = mode == PREF_MODE
    return gr.update(visible=not pref), gr.update(visible=pref), gr.update(visible=not pref)


def train_preset(name, mode="sft"):
    """The form's values under a preset in the chosen mode (the run name, the mode and the RAFT choices are
    kept; sft_core/guide.preset_values), and what the preset does."""
    values = guide.preset_values(name, mode or "sft")
    ups = [gr.skip() if f["name"] in PRESET_KEEPS else
           gr.update(value=",".join(map(str, values[f["name"]] or [])) if f["type"] == "list"
                     and not isinstance(values[f["name"]], str) else values[f["name"]]) for f in train_form_fields()]
    return (guide.PRESET_HELP.get(name, ""), *ups)


def train_raft_mode(mode, preset, kb):
    """TrainConfig.mode chosen: the RAFT box shows in raft mode only (with a knowledge base picked: the one the
    page works with, unless one is chosen), and max length and the RAFT prompt budget take the preset's values
    for that mode (a RAFT prompt needs room for its passages). Outputs: RAFT box, kb, max_length,
    raft_context_tokens."""
    raft = mode == "raft"
    values = guide.preset_values(preset if preset in guide.TRAIN_PRESETS else guide.DEFAULT_PRESET, mode or "sft")
    kbs = kb_choices()
    pick_kb = guide.choose(kb, kbs, guide.default_selection(ws=studio().ws, store=studio().store)["kb"]) if raft else kb
    return (gr.update(visible=raft), gr.update(choices=kbs, value=pick_kb), gr.update(value=values["max_length"]),
            gr.update(value=values["raft_context_tokens"]))


def build_sft_form() -> types.SimpleNamespace:
    """The SFT form (visible in SFT mode), its preset and mode wired. Returns the dataset and base model
    pickers, the fields (``inputs``: in TrainConfig field order, as train_start takes them) and the box."""
    with gr.Column(elem_id="train-sft") as t_sft_box:
        with gr.Row():
            t_dataset = gr.Dropdown(dataset_choices(), allow_custom_value=True, label="Dataset", elem_id="train-dataset")
            t_base = gr.Textbox(value=studio().settings.base_model, label="Base model",
                                info="embedded name, local model directory or hub id")
        train_fields = train_form_fields()
        by_name = {f["name"]: f for f in train_fields}
        hw = guide.hardware_limits()
        preset = guide.preset_values(guide.DEFAULT_PRESET)
        t_fields = {}
        mode_f = by_name["mode"]  # TrainConfig.mode: its choices, in people's words
        t_fields["mode"] = gr.Radio([(TRAIN_MODE_WORDS.get(c, c), c) for c in mode_f["choices"]],
                                    value=mode_f["default"], label=TRAIN_LABELS["mode"],
                                    info=mode_f["help"], elem_id="train-opt-mode")
        with gr.Column(visible=mode_f["default"] == "raft", elem_id="train-raft") as t_raft_box:
            gr.Markdown(RAFT_NOTE, elem_id="train-raft-note")
            with gr.Row():
                kb_f = by_name["kb"]
                t_fields["kb"] = gr.Dropdown(kb_choices(), value=None, allow_custom_value=True,
                                             label=TRAIN_LABELS["kb"], info=kb_f["help"],
                                             elem_id="train-opt-kb")
                for n in ("raft_distractors", "raft_oracle_drop"):
                    t_fields[n] = _form_component(by_name[n], preset.get(n), labels=TRAIN_LABELS)
            with gr.Row():
                for n in ("raft_cite", "raft_context_tokens"):
                    t_fields[n] = _form_component(by_name[n], preset.get(n), labels=TRAIN_LABELS)
        with gr.Row():
            t_preset = gr.Radio(list(guide.TRAIN_PRESETS), value=guide.DEFAULT_PRESET, label="Preset",
                                elem_id="train-preset", scale=2)
            t_preset_help = gr.Markdown(guide.PRESET_HELP[guide.DEFAULT_PRESET], elem_id="train-preset-help")
        gr.Markdown(hw["summary"], elem_id="train-hardware")
        with gr.Accordion("Advanced: LoRA and training options", open=False, elem_id="train-advanced"):
            groups = [names for _, names in TRAIN_GROUPS]
            rest = [f["name"] for f in train_fields if f["name"] not in t_fields
                    and not any(f["name"] in g for g in groups)]
            for title, names in [*TRAIN_GROUPS, ("Other", rest)]:
                names = [n for n in names if n in by_name]
                if not names:
                    continue
                gr.Markdown(f"**{title}**")
                for i in range(0, len(names), 3):
                    with gr.Row():
                        for n in names[i:i + 3]:
                            t_fields[n] = _form_component(by_name[n], preset.get(n, by_name[n]["default"]),
                                                          hw["disabled"].get(n), labels=TRAIN_LABELS)
        t_inputs = [t_fields[f["name"]] for f in train_fields]  # train_start takes them in field order
    t_preset.input(train_preset, [t_preset, t_fields["mode"]], [t_preset_help, *t_inputs], api_visibility="private")
    t_fields["mode"].input(train_raft_mode, [t_fields["mode"], t_preset, t_fields["kb"]],
                           [t_raft_box, t_fields["kb"], t_fields["max_length"], t_fields["raft_context_tokens"]],
                           api_visibility="private", show_progress="hidden")
    return types.SimpleNamespace(box=t_sft_box, dataset=t_dataset, base=t_base, fields=t_fields, inputs=t_inputs)


def build_pref_form() -> types.SimpleNamespace:
    """The preference form (visible in preference mode): the preference dataset, the SFT run to start from,
    the PreferenceConfig fields (``inputs``, in field order, as pref_start takes them) and its Start button."""
    with gr.Column(visible=False, elem_id="train-pref") as t_pref_box:
        with gr.Row():
            tp_dataset = gr.Dropdown(preference_dataset_choices(), value=None, allow_custom_value=True,
                                     label="Preference dataset", elem_id="pref-dataset",
                                     info="pairs built from a campaign's votes (Results tab → Train on "
                                          "these votes) or with `sft-studio pref build`")
            tp_from = gr.Dropdown(finished_runs(), value=None, allow_custom_value=True,
                                  label="Start from SFT run (empty: the base model)", elem_id="pref-from-run")
        pref_fields = pref_form_fields()
        tp_fields = {}
        with gr.Accordion("Preference options (DPO by default)", open=False, elem_id="pref-advanced"):
            for i in range(0, len(pref_fields), 3):
                with gr.Row():
                    for f in pref_fields[i:i + 3]:
                        tp_fields[f["name"]] = _form_component(f, prefix="pref-opt", labels=TRAIN_LABELS)
        tp_inputs = [tp_fields[f["name"]] for f in pref_fields]  # pref_start takes them in field order
        tp_start = gr.Button("Start preference run", variant="primary", elem_id="pref-start")
    return types.SimpleNamespace(box=t_pref_box, dataset=tp_dataset, from_run=tp_from, inputs=tp_inputs,
                                 start=tp_start)
