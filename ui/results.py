"""The Results tab: a campaign's human leaderboard and win rates (hidden from raters until published or
closed), exporting the votes, training on them (a preference run), and the campaign admin (invites,
publish, close)."""
from __future__ import annotations

import types

import gradio as gr
import pandas as pd

from sft_core import StudioError
from sft_core.safety import safe_markdown
from ui.common import admin_ok, admin_required, all_runs, campaign_choices, finished_runs, studio, ui_errors


def _is_admin(is_admin) -> bool:
    return admin_ok(is_admin)


RESULTS_HIDDEN = ("🔒 The results of this campaign are hidden until the admin publishes them or closes the "
                  "campaign, so raters stay blind.")


@ui_errors
def results_show(campaign, is_admin=False):
    """Summary (votes, agreement in words), leaderboard and win rates (row beats column); for anyone
    but the admin only once published or closed (a vote followed by a look at the counts would name
    the system behind each side). Runs on campaign change, Refresh, tab select and after each vote."""
    from evals import leaderboard, rating
    if not campaign:
        return ("_choose a campaign_", pd.DataFrame(columns=leaderboard.board_table({})[0]),
                pd.DataFrame(columns=leaderboard.win_rate_table({})[0]))
    if not _is_admin(is_admin) and not rating.results_visible(campaign, ws=studio().ws, store=studio().store):
        hidden = pd.DataFrame(columns=["hidden until the results are published"])
        return RESULTS_HIDDEN, hidden, hidden
    res = rating.results(campaign, ws=studio().ws, store=studio().store)
    board, winrate = leaderboard.board_table(res), leaderboard.win_rate_table(res)
    return (leaderboard.summary_markdown(res), pd.DataFrame(board[1], columns=board[0]),
            pd.DataFrame(winrate[1], columns=winrate[0]))


@ui_errors
def results_export(campaign, fmt, is_admin):
    from evals import rating
    admin_required(is_admin)
    if not campaign:
        raise StudioError("choose a campaign", "campaign")
    out = studio().ws.root / "exports" / f"{campaign}-{fmt}.{'jsonl' if fmt in ('jsonl', 'dpo') else 'csv'}"
    rating.export_votes(campaign, fmt, out, ws=studio().ws, store=studio().store)
    return studio().stage_download(out)


@ui_errors
def results_train_on_votes(campaign, from_run, is_admin):
    """Results tab → "Train on these votes": the campaign's decisive votes become a preference dataset
    version, and a preference run is queued from the campaign's SFT run (or the run chosen). A campaign
    with nothing to learn from (no decisive votes), or a run that cannot be started from, is answered in
    the message line; nothing is stored then. Outputs: message, the Train tab's run, its mode."""
    from sft_core import pref_train, preference
    admin_required(is_admin)
    if not campaign:
        raise StudioError("choose a campaign", "campaign")
    try:
        dv, run_id = pref_train.train_on_votes(campaign, from_run or None, ws=studio().ws, store=studio().store)
    except StudioError as e:
        return f"❌ Not started: {safe_markdown(str(e))}", gr.skip()
    rep = preference.report(dv.name, dv.version, ws=studio().ws, store=studio().store)
    counts = rep.get("splits") or {}
    pairs = " · ".join(f"{k} {v}" for k, v in counts.items()) if isinstance(counts, dict) else ""
    lineage = pref_train.format_lineage(pref_train.lineage_of_run(run_id, ws=studio().ws, store=studio().store))
    return (f"✅ Preference dataset **{dv.name}@{dv.version}**" + (f" ({pairs} pairs)" if pairs else "")
            + f" built from the votes; preference run **{run_id}** queued. Follow it on the **Train** tab.\n\n"
            + f"**Lineage:** {safe_markdown(lineage)}"), gr.update(choices=all_runs(), value=run_id)


def _base_url(request) -> str:
    """Where the caller reached the app (for invite links): the page's address without its query
    (the Referer of the browser's call, so a path prefix behind a proxy stays); '' makes them relative."""
    from urllib.parse import urlsplit
    try:
        h = {k.lower(): v for k, v in dict(request.headers).items()}
    except Exception:  # noqa: BLE001 - no request
        return ""
    page = urlsplit(h.get("referer", ""))
    if page.scheme in ("http", "https") and page.netloc:
        return f"{page.scheme}://{page.netloc}{page.path}".rstrip("/")
    if h.get("origin", "").startswith(("http://", "https://")):
        return h["origin"].rstrip("/")
    host = h.get("x-forwarded-host") or h.get("host")
    return f"{h.get('x-forwarded-proto', 'http')}://{host}" if host else ""


@ui_errors
def campaign_invite(campaign, names, is_admin, request: gr.Request = None):
    """Admin: one secret invite link per name (shown once; the database keeps only their sha256)."""
    from evals import rating
    admin_required(is_admin)
    if not campaign:
        raise StudioError("choose a campaign", "campaign")
    names = [n.strip() for n in (names or "").replace(",", "\n").splitlines() if n.strip()]
    invites = rating.create_invites(campaign, names, ws=studio().ws, store=studio().store)
    base = _base_url(request)
    lines = [f"Invite links for **{campaign}** (shown once; send each rater their own):", ""]
    lines += [f"- {safe_markdown(i['name'])}: `{base}/?invite={i['token']}`" for i in invites]
    return "\n".join(lines)


@ui_errors
def campaign_publish(campaign, is_admin):
    from evals import rating
    admin_required(is_admin)
    if not campaign:
        raise StudioError("choose a campaign", "campaign")
    rating.publish(campaign, ws=studio().ws, store=studio().store)
    return f"Results of **{campaign}** published: everyone sees them now, and the rating is over."


@ui_errors
def campaign_close(campaign, is_admin):
    from evals import rating
    admin_required(is_admin)
    if not campaign:
        raise StudioError("choose a campaign", "campaign")
    rating.close(campaign, ws=studio().ws, store=studio().store)
    return f"Campaign **{campaign}** closed: no more votes; raters now see the results."


def build(is_admin, votes, t_run) -> types.SimpleNamespace:
    """The Results tab, wired: the results are shown again after each of ``votes`` (the Rate tab's vote
    events), and a preference run started here is picked on the Train tab (``t_run``)."""
    from evals.leaderboard import METHOD_HELP
    with gr.Tab("Results", id="results") as res_tab:
        with gr.Row():
            res_campaign = gr.Dropdown(campaign_choices(), allow_custom_value=True, label="Campaign", elem_id="results-campaign")
            res_refresh = gr.Button("Refresh", elem_id="results-refresh")
        res_summary = gr.Markdown(elem_id="results-summary")
        res_board = gr.Dataframe(label="Human leaderboard: rating (1000 = average; +400 = 10:1 odds) with 95% "
                                 "interval", interactive=False, elem_id="results-board")
        res_winrate = gr.Dataframe(label="Win rate (row beats column)", interactive=False,
                                   elem_id="results-winrate")
        with gr.Accordion("How the ratings are computed", open=False, elem_id="results-method"):
            gr.Markdown(METHOD_HELP)
        with gr.Accordion("Close the loop: train on these votes (admin)", open=False, elem_id="results-loop"):
            gr.Markdown("The campaign's decisive votes (A or B better; ties and \"both bad\" say nothing "
                        "about which answer to prefer, so they are left out) become a preference dataset, and "
                        "a preference run (DPO) starts from the campaign's fine-tuned run: the model learns to "
                        "answer the way the raters preferred. Evaluate it afterwards as `sft:RUN`.")
            with gr.Row(equal_height=True):
                res_pref_from = gr.Dropdown(finished_runs(), value=None, allow_custom_value=True,
                                            label="Start from run (empty: the campaign's fine-tuned run)",
                                            elem_id="results-pref-from")
                res_train = gr.Button("Train on these votes", variant="primary", elem_id="results-train")
            res_train_msg = gr.Markdown(elem_id="results-train-msg")
        with gr.Row():
            res_fmt = gr.Radio(["csv", "jsonl", "dpo"], value="csv", label="Export votes as")
            res_export = gr.Button("Export", elem_id="results-export")
        res_file = gr.File(label="Export", elem_id="results-file")
        with gr.Accordion("Campaign admin: invites, publish, close", open=False, elem_id="results-admin"):
            with gr.Row():
                res_inv_names = gr.Textbox(label="Invite raters (names, one per line or comma-separated)",
                                           lines=2, elem_id="results-invite-names")
                res_invite = gr.Button("Create invite links", elem_id="results-invite")
                res_publish = gr.Button("Publish results", elem_id="results-publish")
                res_close = gr.Button("Close campaign", elem_id="results-close")
            res_admin_msg = gr.Markdown(elem_id="results-admin-msg")
    res_outs = [res_summary, res_board, res_winrate]
    # the public endpoint /results_show is this first registration (the later ones are private)
    res_refresh.click(results_show, [res_campaign, is_admin], res_outs)
    for vote in votes:  # after each vote the Results tab is current too
        vote.success(results_show, [res_campaign, is_admin], res_outs, api_visibility="private")
    res_campaign.change(results_show, [res_campaign, is_admin], res_outs)
    # the campaign dropdown starts on the newest campaign without a change event: show it when the
    # tab opens (and again on every visit, so votes cast meanwhile are counted)
    res_tab.select(results_show, [res_campaign, is_admin], res_outs, api_visibility="private")
    res_export.click(results_export, [res_campaign, res_fmt, is_admin], res_file)
    res_train.click(results_train_on_votes, [res_campaign, res_pref_from, is_admin], [res_train_msg, t_run])
    res_invite.click(campaign_invite, [res_campaign, res_inv_names, is_admin], res_admin_msg)
    res_publish.click(campaign_publish, [res_campaign, is_admin], res_admin_msg).success(
        results_show, [res_campaign, is_admin], res_outs, api_visibility="private")
    res_close.click(campaign_close, [res_campaign, is_admin], res_admin_msg).success(
        results_show, [res_campaign, is_admin], res_outs, api_visibility="private")
    return types.SimpleNamespace(campaign=res_campaign, pref_from=res_pref_from)
