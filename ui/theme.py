"""The page's own script and styles: the Rate tab's keyboard shortcuts and the CSS of the guide, the progress
bars, the passage chips and the chat (both handed to Gradio by app.make_app)."""

RATE_JS = """
() => {
  // Rate tab shortcuts, wherever the focus is except where the rater is typing: 1 = A, 2 = B,
  // 3 = tie, 4 = both bad. Listening on window in the capture phase, before any component can
  // swallow the key; a closed dropdown counts as not typing (picking a campaign leaves the focus
  // there). A held key (auto-repeat) and a key pressed while the last vote is still on its way
  // (the progress line has not changed yet) do nothing, so no vote lands on an unseen task.
  const ids = {'1': 'vote-left', '2': 'vote-right', '3': 'vote-tie', '4': 'vote-bad'};
  const TEXT = ['text', 'search', 'password', 'email', 'number', 'url', 'tel'];
  const typing = (el) => {
    if (!el) return false;
    if (el.isContentEditable) return true;
    const tag = (el.tagName || '').toLowerCase();
    if (tag === 'textarea') return true;
    if (tag !== 'input') return false;
    if (el.getAttribute('role') === 'combobox') return el.getAttribute('aria-expanded') === 'true';
    return TEXT.includes((el.getAttribute('type') || 'text').toLowerCase());
  };
  let pending = null, since = 0;
  window.addEventListener('keydown', (e) => {
    const id = ids[e.key];
    if (!id || e.ctrlKey || e.metaKey || e.altKey || e.isComposing) return;
    const target = (e.composedPath && e.composedPath()[0]) || e.target;
    if (typing(target) || typing(document.activeElement)) return;
    const btn = document.getElementById(id);
    if (!btn || btn.offsetParent === null || btn.disabled) return;
    e.preventDefault();
    e.stopPropagation();
    if (e.repeat) return;
    const progress = (document.getElementById('rate-progress') || {}).innerText || '';
    if (pending === progress && Date.now() - since < 4000) return;
    pending = progress;
    since = Date.now();
    btn.click();
  }, true);
}
"""


APP_CSS = """
/* the guided path: five numbered chips and the next action */
#guide { padding: 10px 12px; border: 1px solid var(--border-color-primary); border-radius: 10px; gap: 6px;
  background: var(--background-fill-secondary); }
#guide .guide-steps { display: flex; flex-wrap: wrap; gap: 6px; list-style: none; margin: 0; padding: 0; }
#guide .step { display: flex; align-items: center; gap: 6px; padding: 3px 10px 3px 3px; border-radius: 999px;
  border: 1px solid var(--border-color-primary); background: var(--background-fill-primary); max-width: 100%; }
#guide .step .num { display: inline-flex; align-items: center; justify-content: center; min-width: 22px; height: 22px;
  border-radius: 999px; font-weight: 600; font-size: 12px; background: var(--border-color-primary); }
#guide .step.done .num { background: #16a34a; color: #fff; }
#guide .step.running .num { background: #f59e0b; color: #fff; }
#guide .step.failed .num { background: #dc2626; color: #fff; }
#guide .step .name { font-weight: 600; }
#guide .step .detail { color: var(--body-text-color-subdued); font-size: 0.85em; max-width: 26em; overflow: hidden;
  text-overflow: ellipsis; white-space: nowrap; }
#guide .guide-next { margin: 0; font-size: 0.92em; }
#guide-actions { align-items: center; }
/* progress bars for background work */
.studio-progress { display: flex; align-items: center; gap: 10px; }
.studio-progress progress { flex: 1; max-width: 420px; height: 10px; accent-color: var(--color-accent); }
/* retrieved passages: collapsible chips */
.passages { display: flex; flex-direction: column; gap: 4px; }
.passages details { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 2px 8px; }
.passages summary { cursor: pointer; font-size: 0.88em; overflow-wrap: anywhere; }
.passages .passage-n { display: inline-block; min-width: 1.4em; font-weight: 600; }
.passages .passage-rel { color: var(--body-text-color-subdued); }
.passages .passage-title { font-size: 0.9em; font-weight: 600; }
.passages .passage-pos { color: var(--body-text-color-subdued); font-size: 0.8em; }
.passages .passage-text { font-size: 0.88em; max-height: 14em; overflow: auto; overflow-wrap: anywhere; }
.passages mark { padding: 0 1px; border-radius: 2px; }
/* chat: the composer stays in view; each pane is headed by its system */
#chat-composer { position: sticky; top: 0; z-index: 20; background: var(--background-fill-primary); }
/* Gradio's container clips with overflow: hidden, which makes it a scroll container and stops sticky;
   clip cuts the same overflow without being one */
.gradio-container { overflow: clip !important; }
.chat-pane-head { align-items: center; }
.chat-info { color: var(--body-text-color-subdued); font-size: 0.85em; }
.chat-truncated { color: #b45309; font-weight: 600; }
/* phone width: nothing wider than the screen; shorter chat panes */
@media (max-width: 640px) {
  #guide .step .detail { display: none; }
  #guide-actions { flex-direction: column; align-items: stretch; }
  #guide-actions > * { min-width: 0 !important; width: 100%; }
  #chat-bot-0, #chat-bot-1, #chat-bot-2, #chat-bot-3 { height: 240px !important; }
}
"""
