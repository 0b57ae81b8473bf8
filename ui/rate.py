"""The Rate tab: blind pairwise rating (A or B, keys 1-4) for a caller the server identifies (an invite, a
Hugging Face account on a Space, a signed open-campaign key); undo; a new campaign from an eval (admin)."""
from __future__ import annotations

import json
import os
import types

import gradio as gr

from sft_core import StudioError
from sft_core.db import evals as eval_rows
from sft_core.safety import safe_markdown
from ui.common import _query_invite, admin_required, campaign_choices, eval_choices, studio, ui_errors


# ------------------------------------------------------------------------------------------------
# Who rates: an invite, a Hugging Face account (on a Space), a signed open-campaign key
# ------------------------------------------------------------------------------------------------
def _hf_oauth_available() -> bool:
    """Hugging Face sign-in is an identity only on a real Space with OAuth configured. Elsewhere
    Gradio mocks the login with the server owner's account, so the app then shows no LoginButton
    (no OAuth routes, no session) and ignores any profile."""
    from gradio.utils import get_space
    if get_space() is None or not os.environ.get("OAUTH_CLIENT_ID"):
        return False
    try:
        import authlib  # noqa: F401  (gradio[oauth])
        import itsdangerous  # noqa: F401
    except ImportError:
        print("warning: OAuth is configured but gradio[oauth] is not installed: rating uses invites only", flush=True)
        return False
    return True


HF_OAUTH: bool | None = None  # asked on first use (hf_oauth); tests set it
MOCK_OAUTH_SUB = "11111111111111111111111"  # gradio.oauth's mocked local profile


def hf_oauth() -> bool:
    """Whether a Hugging Face sign-in identifies raters here (_hf_oauth_available, asked once)."""
    global HF_OAUTH
    if HF_OAUTH is None:
        HF_OAUTH = _hf_oauth_available()
    return HF_OAUTH


def _identify(campaign, invite, name, key, request=None, profile=None) -> tuple[str, str, str | None]:
    """(rater id, display name, open-rating key) for this caller; the id is always server-issued:
    an invite token, a Hugging Face account (on a Space), or a signed open-rating key. A typed name
    only names a new rater on an open campaign when the browser holds no valid key yet."""
    from evals import rating
    if not campaign:
        raise StudioError("choose a campaign", "campaign")
    camp = rating.get_campaign(campaign, ws=studio().ws, store=studio().store)
    token = (invite or "").strip() or _query_invite(request)
    if token:
        r = rating.invite_rater(token, ws=studio().ws, store=studio().store)
        if r is None:
            raise StudioError("this invite is not valid (mistyped or revoked): ask the organiser for a new link", "invite")
        if r["campaign_id"] != campaign:
            raise StudioError(f"your invite is for campaign {r['campaign_id']}, not {campaign}", "invite")
        return r["id"], r["name"], key
    if hf_oauth() and profile is not None and profile.get("sub") != MOCK_OAUTH_SUB and getattr(profile, "username", ""):
        return rating.hf_rater(profile.username, profile.name, ws=studio().ws, store=studio().store), profile.name, key
    if camp["open_rating"]:
        r = rating.open_key_rater(key, ws=studio().ws, store=studio().store) if key else None
        if r is not None:
            return r["id"], r["name"], key
        if not (name or "").strip():
            raise StudioError("enter your name to rate", "rater")
        rid, key = rating.open_rater(name, ws=studio().ws, store=studio().store)
        return rid, name.strip(), key
    raise StudioError("this campaign is by invitation only: open the invite link the organiser sent you"
                      + (", or sign in with Hugging Face" if hf_oauth() else ""), "invite")


@ui_errors
def rate_next(campaign, invite, name, key, request: gr.Request = None, profile: gr.OAuthProfile | None = None):
    """The next blind task for the caller: (task id [session state], prompt, A, B, progress, key)."""
    from evals import rating
    rater, display, key = _identify(campaign, invite, name, key, request, profile)
    return _show_task(rating.next_task(campaign, rater, ws=studio().ws, store=studio().store), display, key)


VOTE_WORDS = {"left": "A is better", "right": "B is better", "tie": "a tie", "both_bad": "both bad"}


def _show_task(task: dict | None, display: str, key, note: str = ""):
    """(task id, prompt, A, B, progress, key) for a task payload of evals.rating (None: all done)."""
    who = f"Rating as **{safe_markdown(display)}**"
    if task is None:
        return None, "🎉 Nothing left for you to rate in this campaign. Thank you!", "", "", who, key
    prompt = f"### Prompt\n\n{safe_markdown(task['prompt'])}"  # dataset and model text load nothing remote
    if task.get("reference"):
        prompt += f"\n\n**Reference answer:** {safe_markdown(task['reference'])}"
    prog = task.get("progress") or {}
    position = prog.get("done", 0) + (0 if note else 1)  # a vote being changed is one of those done
    progress = (f"{who} · task {position} of {prog.get('total', '?')} · {prog.get('done', 0)} rated · "
                f"{prog.get('remaining', '?')} left" + note)
    return task["task_id"], prompt, safe_markdown(task["left"]), safe_markdown(task["right"]), progress, key


@ui_errors
def rate_vote(campaign, invite, name, key, task_id, choice, comment, revise=None, request: gr.Request = None,
              profile: gr.OAuthProfile | None = None):
    """Record the vote (or, after Undo, replace the rater's last one) and show the next task, with a
    confirmation and the Undo button. Outputs: the task outputs, comment, confirmation, Undo, revise."""
    from evals import rating
    rater, display, key = _identify(campaign, invite, name, key, request, profile)
    if not task_id:
        raise StudioError("no task on screen: press Next", "task")
    changed = bool(revise) and revise == task_id
    if changed:
        rating.change_vote(campaign, task_id, rater, choice, comment or "", ws=studio().ws, store=studio().store)
    else:
        rating.vote(campaign, task_id, rater, choice, comment or "", ws=studio().ws, store=studio().store)
    saved = f"✓ {'Vote changed' if changed else 'Saved'}: **{VOTE_WORDS[choice]}**."
    # only where the campaign allows it, and only for the task this rater has just voted on (evals.rating)
    shown = rating.reveal(campaign, task_id, rater, ws=studio().ws, store=studio().store)
    if shown:
        saved += (f" A was **{safe_markdown(shown['left'])}**, B was **{safe_markdown(shown['right'])}** "
                  "(this campaign shows the systems after each vote).")
    task = rating.next_task(campaign, rater, ws=studio().ws, store=studio().store)
    # a revealed vote stays as cast (rating.change_vote refuses it): no Undo then
    return (*_show_task(task, display, key), "", saved, gr.update(visible=not shown), None)


@ui_errors
def rate_undo(campaign, invite, name, key, request: gr.Request = None, profile: gr.OAuthProfile | None = None):
    """Bring the caller's own last vote back on screen; their next choice replaces it (the old vote
    stays in the vote history). Same outputs as rate_vote."""
    from evals import rating
    rater, display, key = _identify(campaign, invite, name, key, request, profile)
    if rating.get_campaign(campaign, ws=studio().ws, store=studio().store)["reveal_after_vote"]:
        raise StudioError("this campaign shows the systems after each vote, so votes cannot be changed", "vote")
    last = rating.last_vote(campaign, rater, ws=studio().ws, store=studio().store)
    if last is None:
        raise StudioError("you have no vote in this campaign to undo", "vote")
    shown = _show_task(last, display, key, note=" · changing your last vote")
    saved = (f"↩ Your vote was **{VOTE_WORDS[last['choice']]}**: choose again (buttons or keys 1–4) to replace it, "
             "or press Next to keep it.")
    return (*shown, last["comment"], saved, gr.update(visible=False), last["task_id"])


@ui_errors
def rate_guidelines(campaign):
    """What the campaign's raters should read before voting (Markdown; empty when it has none)."""
    from evals import rating
    if not campaign:
        return ""
    text = rating.get_campaign(campaign, ws=studio().ws, store=studio().store)["guidelines"]
    return f"**Guidelines for raters**\n\n{safe_markdown(text)}" if text else ""


@ui_errors
def rate_link(request: gr.Request):
    """Page load: an ``?invite=`` link fills the invite box, picks its campaign and opens the Rate tab."""
    from evals import rating
    token = _query_invite(request)
    if not token:
        return gr.update(), gr.update(), gr.update(), gr.update()
    r = rating.invite_rater(token, ws=studio().ws, store=studio().store)
    if r is None:
        return token, gr.update(), "⚠️ This invite link is not valid: ask the organiser for a new one.", \
            gr.Tabs(selected="rate")
    return token, gr.update(value=r["campaign_id"]), f"Invited as **{safe_markdown(r['name'])}**: press **Next** to start.", \
        gr.Tabs(selected="rate")


@ui_errors
def create_campaign(eval_id, systems, open_rating, guidelines, reveal_after_vote, is_admin):
    from evals import rating
    admin_required(is_admin)
    if not eval_id:
        raise StudioError("choose an eval", "eval")
    systems = [s for s in (systems or [])]
    cid = rating.create_campaign(eval_id, systems or None, ws=studio().ws, store=studio().store,
                                 open_rating=bool(open_rating), guidelines=guidelines or "",
                                 reveal_after_vote=bool(reveal_after_vote))
    how = ("anyone may join under a name of their choice" if open_rating else
           "raters need an invite link (Results tab → Campaign admin)")
    if reveal_after_vote:
        how += "; each rater sees which systems answered once they have voted on a task"
    return f"Campaign **{cid}** created: {how}.", gr.update(choices=campaign_choices(), value=cid), \
        gr.update(choices=campaign_choices(), value=cid)


@ui_errors
def eval_systems(eval_id):
    if not eval_id:
        return gr.update(choices=[], value=[])
    row = eval_rows.get(studio().store, eval_id)
    systems = json.loads(row["systems"]) if row else []
    return gr.update(choices=systems, value=systems)


def _voter(choice: str):
    def handler(campaign, invite, name, key, task_id, comment, revise=None, request: gr.Request = None,
                profile: gr.OAuthProfile | None = None):
        return rate_vote(campaign, invite, name, key, task_id, choice, comment, revise, request, profile)
    handler.__name__ = f"vote_{choice}"
    return handler


def build(is_admin) -> types.SimpleNamespace:
    """The Rate tab, wired (but for Create campaign, whose answer also picks the campaign on the Results tab:
    app.build_demo wires it). Returns the campaign picker, the invite box, the progress line, the vote events
    (the Results tab follows them) and the new-campaign form."""
    with gr.Tab("Rate", id="rate") as rate_tab:
        gr.Markdown("Blind pairwise rating: which answer is better, **A** or **B**? System names stay "
                    "hidden. Keys: **1** A is better · **2** B is better · **3** tie · **4** both bad "
                    "(anywhere on the page except while typing in a text box). Open the invite link you "
                    "were sent (open campaigns: pick a name; it sticks to this browser)."
                    + (" Or sign in with Hugging Face." if hf_oauth() else ""))
        if hf_oauth():
            gr.LoginButton()
        with gr.Row():
            r_campaign = gr.Dropdown(campaign_choices(), allow_custom_value=True, label="Campaign", elem_id="rate-campaign")
            r_invite = gr.Textbox(label="Invite code (filled in by your invite link)", type="password",
                                  elem_id="rate-invite")
            r_rater = gr.Textbox(label="Your name (open campaigns)", elem_id="rate-rater")
            r_next = gr.Button("Next", elem_id="rate-next")
        r_task = gr.State(None)
        r_revise = gr.State(None)  # after Undo: the task whose vote the next choice replaces
        # the signed key of an open-campaign rater, kept in this browser's localStorage
        r_key = gr.BrowserState(None, storage_key="sft-studio-rater-key", secret="sft-studio-rater")
        r_guide = gr.Markdown(elem_id="rate-guidelines")
        r_progress = gr.Markdown(elem_id="rate-progress")
        r_prompt = gr.Markdown(elem_id="rate-prompt")
        with gr.Row(equal_height=True):
            with gr.Column():
                gr.Markdown("### A", elem_id="rate-a-title")
                r_left = gr.Markdown(elem_id="rate-left", container=True)
            with gr.Column():
                gr.Markdown("### B", elem_id="rate-b-title")
                r_right = gr.Markdown(elem_id="rate-right", container=True)
        r_comment = gr.Textbox(label="Comment (optional)", max_lines=3, elem_id="rate-comment")
        with gr.Row():
            vote_btns = {c: gr.Button(lbl, elem_id=eid) for c, lbl, eid in [
                ("left", "A is better (1)", "vote-left"), ("right", "B is better (2)", "vote-right"),
                ("tie", "Tie (3)", "vote-tie"), ("both_bad", "Both bad (4)", "vote-bad")]}
        with gr.Row():
            r_saved = gr.Markdown(elem_id="rate-saved")
            r_undo = gr.Button("Undo my last vote", visible=False, size="sm", elem_id="rate-undo")
        new = _build_new_campaign()
    r_outs = [r_task, r_prompt, r_left, r_right, r_progress, r_key]
    r_who = [r_campaign, r_invite, r_rater, r_key]
    r_next.click(rate_next, r_who, r_outs)
    vote_outs = [*r_outs, r_comment, r_saved, r_undo, r_revise]
    votes = [btn.click(_voter(choice), [*r_who, r_task, r_comment, r_revise], vote_outs)
             for choice, btn in vote_btns.items()]
    r_undo.click(rate_undo, r_who, vote_outs)
    r_campaign.change(rate_guidelines, r_campaign, r_guide)
    rate_tab.select(rate_guidelines, r_campaign, r_guide, api_visibility="private")
    new.eval.change(eval_systems, new.eval, new.systems)
    return types.SimpleNamespace(campaign=r_campaign, invite=r_invite, progress=r_progress, votes=votes, new=new)


def _build_new_campaign() -> types.SimpleNamespace:
    """The "New campaign (admin)" accordion: from which eval, which systems, open or by invitation, reveal
    after each vote, guidelines."""
    with gr.Accordion("New campaign (admin)", open=False):
        with gr.Row():
            rc_eval = gr.Dropdown(eval_choices(), allow_custom_value=True, label="From eval", elem_id="rate-new-eval")
            rc_systems = gr.CheckboxGroup([], label="Systems")
            rc_open = gr.Checkbox(False, label="Open rating: anyone joins under a name they pick "
                                  "(trusted rooms only; otherwise invite links)", elem_id="rate-new-open")
            rc_create = gr.Button("Create campaign", elem_id="rate-create")
        rc_reveal = gr.Checkbox(False, label="Show raters which systems were A and B after they "
                                "vote (their vote can then not be changed)", elem_id="rate-new-reveal")
        rc_guide = gr.Textbox(label="Guidelines for raters (optional, shown above every task)", lines=3,
                              placeholder="e.g. Prefer the answer that is correct; length does not matter.",
                              elem_id="rate-new-guidelines")
        rc_msg = gr.Markdown()
    return types.SimpleNamespace(eval=rc_eval, systems=rc_systems, open=rc_open, reveal=rc_reveal, guide=rc_guide,
                                 create=rc_create, msg=rc_msg)
