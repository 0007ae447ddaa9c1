// The live-update stream: server-sent events from /v1/events, read with fetch() so the bearer token goes in
// a header (EventSource cannot send one, and a token in the URL would end up in logs). Pages subscribe to
// event names ('job', 'machine', 'plan_run'); the stream reconnects by itself and stops on logout.

import { session } from './lib.js';

const listeners = new Map();
let controller = null;
let connected = false;

export function subscribe(name, fn) {
  if (!listeners.has(name)) listeners.set(name, new Set());
  listeners.get(name).add(fn);
  ensureStream();
  return () => listeners.get(name).delete(fn);
}

function dispatch(name, data) {
  for (const fn of listeners.get(name) || []) {
    try { fn(data); } catch (e) { console.error(e); }
  }
}

function setStatus(ok) {
  connected = ok;
  const el = document.getElementById('live');
  if (el) { el.textContent = ok ? 'live' : 'offline'; el.className = ok ? 'live on' : 'live off'; }
}

export function stopStream() {
  if (controller) controller.abort();
  controller = null;
  setStatus(false);
}

function ensureStream() {
  if (controller || !session.token) return;
  controller = new AbortController();
  run(controller).finally(() => {
    const stopped = controller === null || controller.signal.aborted;
    controller = null;
    setStatus(false);
    if (!stopped && session.token) setTimeout(ensureStream, 2000);
  });
}

async function run(ctl) {
  let resp;
  try {
    resp = await fetch('/v1/events', { headers: { Authorization: `Bearer ${session.token}`, Accept: 'text/event-stream' },
                                       signal: ctl.signal, credentials: 'omit', cache: 'no-store' });
  } catch { return; }
  if (resp.status === 401) { window.dispatchEvent(new CustomEvent('portal:unauthorized')); return; }
  if (!resp.ok || !resp.body) return;
  setStatus(true);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value.replace(/\r\n/g, '\n');
      let cut;
      while ((cut = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
        let name = 'message'; const data = [];
        for (const line of block.split('\n')) {
          if (line.startsWith(':')) continue;
          const i = line.indexOf(':');
          const field = i < 0 ? line : line.slice(0, i);
          const v = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
          if (field === 'event') name = v; else if (field === 'data') data.push(v);
        }
        if (name === 'revoked') { window.dispatchEvent(new CustomEvent('portal:unauthorized')); return; }
        if (data.length) {
          try { dispatch(name, JSON.parse(data.join('\n'))); } catch (e) { console.error(e); }
        }
      }
    }
  } catch { /* aborted or dropped: the caller reconnects */ }
}

export function isLive() { return connected; }
