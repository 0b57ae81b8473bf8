"""The Chat tab: one message to up to four systems (prompted, RAG, fine-tuned, fine-tuned + RAG ...), their
answers streamed side by side with the passages they used and a line on each answer."""
from __future__ import annotations

import asyncio
import functools
import threading
import time
import types

import gradio as gr

from sft_core import StudioError
from sft_core.config import DecodingConfig, load_config
from sft_core.safety import safe_markdown
from sft_core.studio import EXAMPLE_NAME
from ui.common import chat_allowed, kb_choices, studio, system_choices, ui_errors
from ui.passages import _hits_markdown


CHAT_KINDS = {"prompt": "base model, prompted", "rag": "base model + retrieved passages", "sft": "fine-tuned",
              "sft+rag": "fine-tuned + retrieved passages",
              "raft": "fine-tuned with retrieved passages (RAFT) + retrieved passages", "openai": "remote model"}


def chat_heads(s1, s2, s3, s4):
    """Each chat pane's heading: the system's short name and what it is."""
    from evals import report
    chosen = [s for s in (s1, s2, s3, s4) if s]
    short = report.short_names(chosen)
    out = []
    for i, sys_ in enumerate((s1, s2, s3, s4)):
        if not sys_:
            out.append(f"**Pane {i + 1}** · _choose a system_")
            continue
        kind = sys_.partition(":")[0]
        out.append(f"**{safe_markdown(short[sys_])}** · {CHAT_KINDS.get(kind, '')}")
    return tuple(out)


def _system_messages(system: str, message: str, kb: str | None):
    """Messages + adapter + passages for one chat system."""
    from evals import systems as evsys
    return evsys.chat_request(system, message, kb=kb, ws=studio().ws, store=studio().store, tokenizer=_gen_tokenizer())


@functools.lru_cache(maxsize=1)
def _gen_tokenizer():
    """The generator's tokenizer (the RAG context budget is counted in its tokens)."""
    from sft_core import models
    return models.load_tokenizer(models.resolve_model(studio().settings.base_model, ws=studio().ws))


# How often a streaming chat pushes its text to the browser: 4 updates a second reads as live, and
# with many visitors each update (four chat histories, serialised and diffed by Gradio) costs server
# CPU that the engine on a small machine needs.
CHAT_UPDATE_S = 0.25


class _Pane:
    """One chat pane's answer while it streams: filled by its worker thread (_answer), shown by chat_send."""

    def __init__(self):
        self.passages = ""  # the passages its system retrieved, as chips
        self.info: dict = {}  # the engine fills it at the stream's end (answer_info)
        self.failed = False
        self.raw = ""  # the model's text; the chat shows safe_markdown(raw): no remote image is ever fetched


def _answer(i: int, pane: _Pane, system: str, message: str, kb: str | None, engine, decoding, put) -> None:
    """Pane ``i``'s answer, in a thread of its own: its passages, then the engine's text delta by delta through
    ``put`` ((i, delta), and (i, None) at the end); a failure is shown in that pane."""
    try:
        req = _system_messages(system, message, kb)
        if req.get("passages"):
            pane.passages = _hits_markdown(req["passages"], message)
        for delta in engine.chat(req["messages"], adapter=req.get("adapter"), decoding=decoding, info=pane.info):
            put((i, delta))
    except StudioError as e:
        pane.failed = True
        put((i, f"\n⚠️ {e}"))
    except Exception as e:  # engine trouble: show it in that column
        pane.failed = True
        put((i, f"\n⚠️ {type(e).__name__}: {e}"))
    finally:
        put((i, None))


@ui_errors
async def chat_send(message, s1, s2, s3, s4, kb, temperature, max_new_tokens, is_admin, h1, h2, h3, h4):
    """Stream up to four systems' answers side by side.

    An async generator on purpose: Gradio runs a sync generator's every step in a worker thread, and with
    many visitors those thread hops (each waiting for the GIL and a core the engine is using) were most of
    the latency the app added on top of the engine. The engine's blocking streams run in threads of their
    own (_answer) and hand their text to the event loop through an asyncio queue."""
    chat_allowed(is_admin)
    if not (message or "").strip():
        raise StudioError("type a message", "message")
    decoding = load_config(DecodingConfig, overrides={"temperature": temperature, "max_new_tokens": max_new_tokens})
    engine = studio().engine()
    hists = [list(h or []) for h in (h1, h2, h3, h4)]
    panes = [_Pane() for _ in range(4)]
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()

    def put(item) -> None:
        loop.call_soon_threadsafe(q.put_nowait, item)

    live = []
    for i, system in enumerate((s1, s2, s3, s4)):
        if system:
            hists[i] = hists[i] + [{"role": "user", "content": safe_markdown(message)},
                                   {"role": "assistant", "content": ""}]
            threading.Thread(target=_answer, args=(i, panes[i], system, message, kb or None, engine, decoding, put),
                             daemon=True).start()
            live.append(i)
    pending = set(live)
    # the previous answers' lines go; a pane without a system keeps nothing
    yield (*hists, *(p.passages for p in panes), *("_answering…_" if i in live else "" for i in range(4)))
    last = time.monotonic()
    changed: set[int] = set()
    while pending:
        i, delta = await q.get()
        if delta is None:
            pending.discard(i)
        else:
            panes[i].raw += delta
            hists[i][-1]["content"] = safe_markdown(panes[i].raw)
            changed.add(i)
        if pending and changed and time.monotonic() - last > CHAT_UPDATE_S:
            last = time.monotonic()
            # only the panes that changed: Gradio postprocesses and diffs every output it is given, and on a
            # small CPU that server work competes with the engine for the cores
            yield (*(hists[k] if k in changed else gr.skip() for k in range(4)), *(gr.skip(),) * 8)
            changed.clear()
    yield (*hists, *(p.passages for p in panes),
           *(answer_info(p.info, decoding.max_new_tokens) if i in live and not p.failed else ""
             for i, p in enumerate(panes)))


def answer_info(info: dict, max_new_tokens: int) -> str:
    """The line under an answer: how long it took and how many tokens it has, and a badge when the
    engine cut it at the token limit (finish_reason "length"). Empty when the engine reported nothing."""
    if not info:
        return ""
    parts = []
    if info.get("latency_s") is not None:
        parts.append(f"{info['latency_s']:.1f} s")
    n = info.get("completion_tokens")
    if n is not None:
        parts.append(f"{n} token{'s' if n != 1 else ''}")
    line = " · ".join(parts)
    if info.get("finish_reason") == "length":
        badge = (f'<span class="chat-truncated" title="the answer reached Max new tokens ({max_new_tokens}) and was '
                 f'cut there: raise the limit for the rest">⚠ truncated at {n if n is not None else max_new_tokens} '
                 'tokens</span>')
        line = f"{line} · {badge}" if line else badge
    return f'<span class="chat-info">{line}</span>' if line else ""


def build(is_admin) -> types.SimpleNamespace:
    """The Chat tab, wired. Returns the knowledge-base picker and the four system pickers (the page load
    restores and refreshes them)."""
    with gr.Tab("Chat", id="chat"):
        # the composer first (and sticky): it stays in view however long the answers grow
        with gr.Row(elem_id="chat-composer", equal_height=True):
            c_msg = gr.Textbox(label="Message", placeholder="Ask something about your domain…", scale=5,
                               max_lines=4, elem_id="chat-msg")
            c_send = gr.Button("Send to all", variant="primary", scale=1, min_width=110, elem_id="chat-send")
        with gr.Row():
            c_kb = gr.Dropdown(kb_choices(), allow_custom_value=True, value=EXAMPLE_NAME if EXAMPLE_NAME in kb_choices() else None,
                               label="Knowledge base (for RAG)", elem_id="chat-kb")
            c_temp = gr.Slider(0, 1.5, value=0.0, step=0.05, label="Temperature")
            c_max = gr.Slider(16, 1024, value=128, step=16, label="Max new tokens", elem_id="chat-max")
        c_sys, c_heads, c_bots, c_pass, c_info = [], [], [], [], []
        first = ["prompt", "rag", None, None]
        for row in range(2):  # a 2 x 2 grid (one column on a phone)
            with gr.Row(elem_classes=["chat-grid"]):
                for i in (2 * row, 2 * row + 1):
                    with gr.Column(min_width=300, elem_classes=["chat-pane"]):
                        with gr.Row(elem_classes=["chat-pane-head"], equal_height=True):
                            c_heads.append(gr.Markdown(chat_heads(*first)[i], elem_id=f"chat-head-{i}"))
                            c_sys.append(gr.Dropdown(system_choices(), allow_custom_value=True, value=first[i],
                                                     label=f"System {i + 1}", show_label=False, container=False,
                                                     min_width=140, elem_id=f"chat-sys-{i}"))
                        c_bots.append(gr.Chatbot(label=f"System {i + 1}", show_label=False, height=320,
                                                 elem_id=f"chat-bot-{i}"))
                        c_info.append(gr.Markdown(elem_id=f"chat-info-{i}", elem_classes=["chat-info-line"]))
                        c_pass.append(gr.Markdown(elem_id=f"chat-passages-{i}"))
    chat_inputs = [c_msg, *c_sys, c_kb, c_temp, c_max, is_admin, *c_bots]
    c_send.click(chat_send, chat_inputs, [*c_bots, *c_pass, *c_info])
    c_msg.submit(chat_send, chat_inputs, [*c_bots, *c_pass, *c_info])
    for c in c_sys:
        c.change(chat_heads, c_sys, c_heads, api_visibility="private", show_progress="hidden")
    return types.SimpleNamespace(kb=c_kb, systems=c_sys)
